"""Training with ``compile=True``: the same training up to float32 rounding, and never a lost fit."""

from __future__ import annotations

import pytest
import torch
from test_checkpoint import OPTIONS, Stop, data, raise_after

import sbiflows.compiling
from sbiflows import NPE, training
from sbiflows.checkpoint import Checkpoint
from sbiflows.flows import nsf
from sbiflows.training import train

PRIOR = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)


def small_flow() -> torch.nn.Module:
    torch.manual_seed(1)
    return nsf(2, 2, transforms=1, hidden_features=(8,))


def failing_compile(monkeypatch) -> None:
    """As on a machine without a C++ compiler: the compiled function raises when first called."""
    def compile(fn, **options):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines")
        return compiled

    monkeypatch.setattr(sbiflows.compiling.torch, "compile", compile)


def test_a_failed_compile_warns_once_and_trains_exactly_as_eagerly(monkeypatch):
    plain = train(small_flow(), *data(), **OPTIONS)
    failing_compile(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"could not compile the training step \(RuntimeError: InvalidCxxCompiler: "
                                            r"No working C\+\+ compiler found\); training goes on without") as caught:
        fallback = train(small_flow(), *data(), compile=True, **OPTIONS)
    assert len([w for w in caught if "could not compile" in str(w.message)]) == 1
    assert fallback.train_loss == plain.train_loss and fallback.validation_loss == plain.validation_loss


def test_compile_must_be_a_bool_and_is_part_of_the_checkpoint_key(tmp_path, monkeypatch):
    for call in (lambda: train(small_flow(), *data(), compile="yes"),
                 lambda: NPE(PRIOR).fit(*data(), compile=1, progress=False)):
        with pytest.raises(TypeError, match="compile must be True or False, got"):
            call()
    path = tmp_path / "training.ckpt"
    train(small_flow(), *data(), checkpoint=Checkpoint(path), **OPTIONS)  # an eager fit's finished checkpoint
    failing_compile(monkeypatch)
    checkpoint = Checkpoint(path)
    with pytest.warns(RuntimeWarning, match="could not compile"):
        train(small_flow(), *data(), checkpoint=checkpoint, compile=True, **OPTIONS)
    assert checkpoint.resumed_epoch is None  # another call: trained afresh, not the eager fit's weights


def test_the_command_line_passes_compile_to_training_and_records_it(tmp_path):
    from sbiflows.cli import _setup
    from sbiflows.cli_parser import build_parser

    args = build_parser().parse_args(["fit", "two_moons", "--compile", "--out", str(tmp_path / "x")])
    job = _setup(args)
    assert job.compile and job.fit_options["compile"] is True and job.settings()["compile"] is True
    plain = _setup(build_parser().parse_args(["fit", "two_moons", "--out", str(tmp_path / "x")]))
    assert "compile" not in plain.fit_options and "compile" not in plain.settings()  # old run folders resume


@pytest.mark.slow
def test_a_compiled_fit_matches_the_eager_one_to_rounding_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """One flow (the training loop of the default) and three trained together (the vectorized loop)."""
    eager = train(small_flow(), *data(), **OPTIONS)
    validating = torch.distributions.Distribution._validate_args
    compiled = train(small_flow(), *data(), compile=True, **OPTIONS)
    # torch.compile turns distributions' argument validation off process-wide; the user's setting is kept
    assert torch.distributions.Distribution._validate_args == validating
    # the first epoch's losses agree to float32 rounding; later the trajectories drift apart (chaotic)
    assert compiled.train_loss[0] == pytest.approx(eager.train_loss[0], abs=1e-4)
    assert compiled.validation_loss[0] == pytest.approx(eager.validation_loss[0], abs=1e-4)
    again_model = small_flow()
    again = train(again_model, *data(), compile=True, **OPTIONS)
    assert again.validation_loss == compiled.validation_loss  # compiled kernels are deterministic

    path = tmp_path / "training.ckpt"
    with monkeypatch.context() as patch:
        raise_after(patch, training, "_evaluate", 5)  # killed in the sixth epoch's validation pass
        with pytest.raises(Stop):
            train(small_flow(), *data(), compile=True, checkpoint=Checkpoint(path, every=0.0), **OPTIONS)
    checkpoint = Checkpoint(path, every=0.0)
    resumed_model = small_flow()
    resumed = train(resumed_model, *data(), compile=True, checkpoint=checkpoint, **OPTIONS)
    assert checkpoint.resumed_epoch == 5 and resumed.validation_loss == compiled.validation_loss
    for (name, a), b in zip(again_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name

    options = dict(max_epochs=6, batch_size=32, progress=False)
    members = NPE(PRIOR, ensemble=3, transforms=1, hidden_features=(8,)).fit(*data(), compile=True, **options)
    plain = NPE(PRIOR, ensemble=3, transforms=1, hidden_features=(8,)).fit(*data(), **options)
    assert members.history.validation_loss[0] == pytest.approx(plain.history.validation_loss[0], abs=1e-4)
    u, x = data()
    assert torch.allclose(members.log_prob(u[:20], x[0]), plain.log_prob(u[:20], x[0]), atol=0.05)


def test_a_failed_compile_is_not_tried_again_when_the_batch_grows_at_a_drop(monkeypatch):
    failing_compile(monkeypatch)
    with pytest.warns(RuntimeWarning, match="could not compile") as caught:
        history = train(small_flow(), *data(), compile=True, drop_batch_factor=2.0, **OPTIONS)
    assert history.step_drop_epochs  # the batch grew, so a new compiled step would have been built
    assert len([w for w in caught if "could not compile" in str(w.message)]) == 1

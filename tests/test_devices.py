"""Posteriors between devices: .to(device), and files saved on one device loaded on another.

The CPU tests move through the ``meta`` device (shapes without data) to exercise the device logic;
the ``gpu`` tests repeat the round trips on CUDA when a GPU is present.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal, Uniform
from gpu_device import GPU

from sbiflows import NPE, load


@pytest.fixture(scope="module")
def box_posterior():
    prior = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)
    generator = torch.Generator().manual_seed(0)
    theta = prior.sample((400,))
    x = theta + 0.1 * torch.randn(400, 2, generator=generator)
    return NPE(prior, transforms=2, hidden_features=(16, 16)).fit(theta, x, max_epochs=3, progress=False)


def test_a_file_loads_onto_the_device_map_location_names(box_posterior, tmp_path):
    box_posterior.save(tmp_path / "p.pt")
    loaded = load(tmp_path / "p.pt", map_location="meta")
    assert loaded.device.type == "meta"
    assert all(p.device.type == "meta" for p in loaded.net.parameters())
    assert loaded.prior.base_dist.low.device.type == "meta"
    assert load(tmp_path / "p.pt").device.type == "cpu"  # the default: the CPU, wherever it was saved


def test_a_prior_passed_to_load_goes_where_the_network_goes(box_posterior, tmp_path):
    """The saved prior was built on ``map_location`` but a prior passed to ``load`` stayed where it was."""
    box_posterior.save(tmp_path / "p.pt")
    loaded = load(tmp_path / "p.pt", prior=box_posterior.prior, map_location="meta")
    assert loaded.prior.base_dist.low.device.type == "meta" and loaded.device.type == "meta"
    assert load(tmp_path / "p.pt", prior=box_posterior.prior).prior is box_posterior.prior  # already there


def test_moving_records_the_device_and_keeps_the_original(box_posterior):
    moved = box_posterior.copy().to("meta")
    assert moved.device.type == "meta" and box_posterior.device.type == "cpu"
    stays = box_posterior.copy()
    prior = stays.prior
    assert stays.to("cpu").prior is prior  # a move to where it is keeps the prior object


def test_a_prior_on_another_device_is_rebuilt_where_npe_trains():
    prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)  # (meta has no values to find a box's bounds)
    npe = NPE(prior, device="meta")
    assert npe.device.type == "meta" and npe.prior.base_dist.loc.device.type == "meta"
    assert prior.base_dist.loc.device.type == "cpu"  # the user's prior is not changed
    assert NPE(prior, device="cpu").prior is prior
    from sbiflows.prior_specs import move_prior

    assert move_prior(prior, "cpu") is prior  # already there: the same object, not a rebuilt one
    assert move_prior(prior, "meta") is not prior


def test_a_prior_that_cannot_move_is_a_clear_error_before_training():
    class Custom(torch.distributions.Normal):  # not one of the classes a prior can be rebuilt from
        def log_prob(self, value):
            return super().log_prob(value) + 1.0

    with pytest.raises(ValueError, match="cannot move a Independent prior to meta"):
        NPE(Independent(Custom(torch.zeros(2), torch.ones(2)), 1), device="meta")


@pytest.mark.parametrize("device", ["meta", pytest.param(GPU, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("estimator,embedding,x_shape", [
    ("maf", None, (3,)), ("realnvp", None, (3,)), ("nsf", None, (3,)), ("nsf", "auto", (40,)),
    ("nsf", "set", (6, 2)), ("nsf", "cnn1d", (30,)), ("maf", "cnn2d", (8, 8)), ("realnvp", "mlp", (3, 4)),
])
def test_every_network_runs_on_the_device_it_was_moved_to(estimator, embedding, x_shape, device):
    """A trained network (z-scoring, embedding, flow) computes on its device; ``meta`` stands in for a GPU: a CPU
    tensor mixed into elementwise arithmetic with meta tensors raises as on CUDA (not in matrix products; see
    tests/test_transforms.py, which does this per layer). On CUDA the density must equal the CPU's."""
    from sbiflows.embeddings import from_name

    prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    theta, x = prior.sample((200,)), torch.randn(200, *x_shape)
    net = embedding if embedding in (None, "auto") else from_name(embedding, x_shape)
    posterior = NPE(prior, estimator=estimator, embedding_net=net, transforms=2, ensemble=1).fit(
        theta, x, max_epochs=1, progress=False)
    on_cpu = posterior.net.log_prob_given_context(theta[:5], posterior.net.context(x[:5]))
    net = posterior.net.to(device)
    context = net.context(x[:5].to(device))
    assert context.device.type == device and context.shape[0] == 5
    log_prob = net.log_prob_given_context(theta[:5].to(device), context)
    assert log_prob.shape == (5,) and log_prob.device.type == device
    assert net.sample_given_context(4, context).device.type == device
    draws, log_q = net.sample_and_log_prob_from_base(torch.zeros(4, 5, 2, device=device), context)
    assert draws.shape == (4, 5, 2) and log_q.device.type == device
    if device != "meta":
        torch.testing.assert_close(log_prob.cpu(), on_cpu, atol=1e-4, rtol=1e-4)  # float32 on another device


def test_an_ensembles_density_runs_on_the_device_it_was_moved_to():
    """The mixture's density on the device (its draws pick members by value, which meta tensors do not have)."""
    prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    theta = prior.sample((200,))
    net = NPE(prior, ensemble=2, transforms=2).fit(theta, theta + 0.1, max_epochs=1, progress=False).net.to("meta")
    context = net.context(torch.zeros(5, 2, device="meta"))
    assert net.log_prob_given_context(torch.zeros(5, 2, device="meta"), context).device.type == "meta"


@pytest.mark.gpu
def test_cuda_round_trip_gives_the_same_numbers(box_posterior, tmp_path):
    x_o, theta = torch.zeros(2), torch.rand(50, 2) * 2 - 1
    on_gpu = box_posterior.copy().to(GPU)
    assert on_gpu.device.type == GPU and on_gpu.prior.base_dist.low.device.type == GPU
    torch.testing.assert_close(on_gpu.log_prob(theta, x_o).cpu(), box_posterior.log_prob(theta, x_o),
                               atol=1e-4, rtol=1e-4)
    samples = on_gpu.sample(10_000, x_o, seed=0)
    assert samples.device.type == GPU and bool((samples.abs() < 1).all())
    on_gpu.save(tmp_path / "gpu.pt")
    back = load(tmp_path / "gpu.pt")  # saved on CUDA, loads on the CPU
    assert back.device.type == "cpu"
    torch.testing.assert_close(back.log_prob(theta, x_o), box_posterior.log_prob(theta, x_o))
    assert load(tmp_path / "gpu.pt", map_location=GPU).device.type == GPU


@pytest.mark.gpu
def test_npe_trains_on_cuda():
    prior = Independent(Uniform(-torch.ones(2, device=GPU), torch.ones(2, device=GPU)), 1)
    theta = prior.sample((500,))
    x = theta + 0.1 * torch.randn_like(theta)
    posterior = NPE(prior, transforms=2, hidden_features=(16, 16)).fit(theta, x, max_epochs=3, progress=False)
    assert posterior.device.type == GPU
    assert posterior.sample(100, x[0]).device.type == GPU


@pytest.mark.gpu
def test_a_cpu_prior_and_cpu_simulations_train_on_cuda_as_they_are():
    prior = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)
    theta = prior.sample((500,))
    x = (theta + 0.1 * torch.randn_like(theta)).numpy()  # a numpy simulator's output
    posterior = NPE(prior, transforms=2, hidden_features=(16, 16), device=GPU).fit(theta, x, max_epochs=3,
                                                                                     progress=False)
    assert posterior.device.type == GPU and posterior.prior.base_dist.low.device.type == GPU
    samples = posterior.sample(1000, x[0], seed=0)
    assert samples.device.type == GPU and bool((samples.abs() < 1).all())
    assert torch.isfinite(posterior.log_prob(theta[:10], x[0])).all()


@pytest.mark.gpu
def test_ensemble_members_train_together_on_cuda():
    from sbiflows.ensemble_training import train_members
    from sbiflows.flows import nsf
    from sbiflows.training import TrainingHistory

    theta = torch.randn(500, 2, device=GPU)
    x = theta + 0.1 * torch.randn_like(theta)
    members = [nsf(2, 2, transforms=2, hidden_features=(16,)).to(GPU) for _ in range(2)]
    histories = [TrainingHistory(), TrainingHistory()]
    assert train_members(members, theta, x, seeds=[0, 1], histories=histories, validations=[None, None],
                         max_epochs=3, batch_size=64) == "vectorized"
    assert [h.epochs for h in histories] == [3, 3]
    assert all(p.device.type == GPU for member in members for p in member.parameters())


@pytest.mark.gpu
def test_the_command_line_trains_on_cuda_and_checks_on_the_cpu(tmp_path, monkeypatch, capsys):
    import json

    from sbiflows.cli import main
    import sbiflows.pipeline

    trained_on, sampled_on = [], []
    fit, sample = NPE.fit, sbiflows.pipeline._sample

    def recording_fit(self, *args, **kwargs):
        trained_on.append(self.device.type)
        return fit(self, *args, **kwargs)

    def recording_sample(state, posterior):
        sampled_on.append(posterior.device.type)
        return sample(state, posterior)

    monkeypatch.setattr(NPE, "fit", recording_fit)
    monkeypatch.setattr(sbiflows.pipeline, "_sample", recording_sample)

    small = ["--simulations", "600", "--num-samples", "400", "--calibration-datasets", "100",
             "--calibration-samples", "100", "--c2st-samples", "400", "--max-epochs", "5", "--quiet",
             "--device", GPU]
    for rounds in ("1", "2"):  # amortized, and TSNPE (its proposals reach the simulator as CPU tensors)
        out = tmp_path / f"rounds{rounds}"
        assert main(["fit", "two_moons", "--out", str(out), "--observations", "1", "--rounds", rounds, *small]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["training"]["epochs"] >= 1 and 0.4 < report["observations"][0]["c2st"] <= 1
        assert load(out / "posterior.pt").device.type == "cpu"
        printed = capsys.readouterr().out
        if GPU != "cpu":  # the pipeline names the device only when it is not the CPU
            named = ("training NPE" in printed and ") on cuda" in printed) if rounds == "1" else (
                "training on cuda" in printed)
            assert named
    assert trained_on == [GPU] * 3 and sampled_on == ["cpu", "cpu"]  # one fit, then one per round


@pytest.mark.gpu
def test_simulating_cuda_parameters_into_a_store():
    import tempfile

    from sbiflows.simulate import simulate

    theta = torch.rand(50, 2, device=GPU)
    with tempfile.TemporaryDirectory() as folder:
        sims = simulate(lambda t: t.cpu() * 2, theta, seed=0, batch_size=20, store=f"{folder}/s.zarr")
        assert sims.valid.all() and torch.equal(sims.x, theta.cpu() * 2)
        again = simulate(lambda t: t.cpu() * 2, theta, seed=0, batch_size=20, store=f"{folder}/s.zarr")
        assert again.reused == 50  # the stored theta matches the CUDA one


@pytest.mark.gpu
def test_the_calibration_checks_take_a_posterior_on_cuda(box_posterior):
    """Draws and densities come back to the CPU for the statistics; the predictive simulator gets CPU tensors."""
    from sbiflows import diagnostics

    on_gpu = box_posterior.copy().to(GPU)
    theta = torch.rand(100, 2) * 2 - 1
    x = theta + 0.1 * torch.randn(100, 2)
    for check in (diagnostics.sbc, diagnostics.expected_coverage, diagnostics.tarp):
        result = check(on_gpu, theta=theta, x=x, num_posterior_samples=100, seed=0)  # 100: no warning
        assert diagnostics.verdict(result) in ("calibrated", "over-confident", "under-confident", "biased",
                                               "mis-calibrated", "conservative")
    seen = []

    def simulator(t):
        seen.append(t.device.type)
        return t + 0.1 * torch.randn_like(t)

    diagnostics.posterior_predictive(on_gpu, simulator, torch.zeros(2), num_samples=200, seed=0)
    assert seen == ["cpu"]


@pytest.mark.gpu
def test_seeded_checks_and_fits_leave_the_cuda_generator_as_it_was(box_posterior):
    """They seeded with ``torch.manual_seed`` inside a fork of the CPU generator alone, which reseeded CUDA's."""
    from sbiflows import diagnostics

    on_gpu = box_posterior.copy().to(GPU)
    theta = torch.rand(100, 2) * 2 - 1
    x = theta + 0.1 * torch.randn(100, 2)
    cuda = GPU != "cpu"  # a dry run checks the CPU generator the same way
    (torch.cuda.manual_seed if cuda else torch.manual_seed)(123)
    state = torch.cuda.get_rng_state if cuda else torch.random.get_rng_state
    before = state()
    first = diagnostics.sbc(on_gpu, theta=theta, x=x, num_posterior_samples=100, seed=0)
    assert torch.equal(state(), before)
    again = diagnostics.sbc(on_gpu, theta=theta, x=x, num_posterior_samples=100, seed=0)
    assert torch.equal(first.ranks, again.ranks)  # seeded on the GPU too
    NPE(box_posterior.prior, device=GPU, transforms=1).fit(theta, x, max_epochs=1, progress=False, seed=0)
    assert torch.equal(state(), before)


@pytest.mark.gpu
def test_map_and_the_conditioned_distribution_on_cuda(box_posterior):
    """The MAP search and the pyro-style conditioned posterior compute on the posterior's device."""
    on_gpu = box_posterior.copy().to(GPU)
    x_o = torch.zeros(2)
    best = on_gpu.map(x_o, num_init_samples=200, num_to_optimize=5, num_iter=20, seed=0)
    assert best.device.type == GPU and bool((best.abs() <= 1).all())
    conditioned = on_gpu.condition(x_o)
    draws = conditioned.rsample((50,), generator=torch.Generator(device=GPU).manual_seed(0))
    assert draws.device.type == GPU and draws.requires_grad
    log_prob = conditioned.log_prob(draws.detach())
    torch.testing.assert_close(log_prob.cpu(), box_posterior.condition(x_o).log_prob(draws.detach().cpu()),
                               atol=1e-4, rtol=1e-4)
    assert on_gpu.sample_batched(20, torch.zeros(3, 2)).shape == (20, 3, 2)  # CPU observations move to the GPU


@pytest.mark.slow
@pytest.mark.skipif(GPU != "cuda", reason="this is the dry run's own check")
def test_the_gpu_tests_pass_a_dry_run_on_the_cpu():
    """The ``gpu``-marked tests only run where there is a GPU, which most machines that run this suite lack: run
    them all on the CPU (``SBIFLOWS_GPU_TESTS_ON_CPU=1``, tests/gpu_device.py), so that a broken assertion or a
    warning the suite turns into an error shows here, not first on a lent GPU."""
    import glob
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [path for path in sorted(glob.glob(str(root / "tests" / "test_*.py")))
             if "mark.gpu" in Path(path).read_text()]
    env = {**os.environ, "SBIFLOWS_GPU_TESTS_ON_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *files]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary

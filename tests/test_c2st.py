"""C2ST (sbibm protocol): null and disjoint cases, Bayes accuracy of shifted Gaussians, seeding, input checks."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from sbiflows.diagnostics import c2st, c2st_batched
from sbiflows.diagnostics.c2st import _FoldMLP


def gaussians(n: int, dim: int, shift: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    b[:, 0] += shift
    return a, b


def test_c2st_identical_distributions_score_about_one_half():
    result = c2st(*gaussians(500, 2, 0.0))
    assert abs(result.accuracy - 0.5) < 0.05
    assert result.passed
    assert "PASSED" in str(result) and f"{result.accuracy:.3f}" in str(result)


def test_c2st_disjoint_distributions_score_one():
    result = c2st(*gaussians(500, 2, 20.0))
    assert result.accuracy > 0.99
    assert not result.passed
    assert "FAILED" in str(result)


def test_c2st_follows_the_bayes_accuracy_of_shifted_gaussians():
    # The best possible accuracy between N(0, 1) and N(s, 1) is Phi(s / 2).
    accuracies = []
    for shift in (0.5, 1.0, 2.0):
        accuracy = c2st(*gaussians(500, 2, shift, seed=3)).accuracy
        bayes = 0.5 * (1 + math.erf(shift / 2 / math.sqrt(2)))
        assert abs(accuracy - bayes) < 0.05, (shift, accuracy, bayes)
        accuracies.append(accuracy)
    assert accuracies == sorted(accuracies)


def test_c2st_result_fields_are_consistent():
    result = c2st(*gaussians(200, 3, 1.0), folds=4, threshold=0.7, max_epochs=30)
    assert len(result.fold_accuracies) == len(result.epochs) == 4
    assert result.accuracy == pytest.approx(sum(result.fold_accuracies) / 4)
    assert (result.num_samples, result.dim, result.threshold) == (200, 3, 0.7)
    assert result.passed == (result.accuracy <= 0.7)
    assert all(1 <= e <= 30 for e in result.epochs)


def test_c2st_is_seeded_and_leaves_global_state_alone():
    a, b = gaussians(300, 2, 0.5)
    rng_state, threads = torch.get_rng_state(), torch.get_num_threads()
    first, again, other = (c2st(a, b, seed=s, max_epochs=30) for s in (5, 5, 6))
    assert first == again
    assert first.fold_accuracies != other.fold_accuracies
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert torch.get_num_threads() == threads


def test_c2st_z_scores_with_the_first_set():
    a, b = gaussians(300, 2, 1.0)
    scaled = c2st(a * 1000 + 7, b * 1000 + 7, max_epochs=30)
    assert scaled.accuracy == pytest.approx(c2st(a, b, max_epochs=30).accuracy, abs=0.01)


def test_c2st_manual_backward_matches_autograd():
    g = torch.Generator().manual_seed(0)
    mlp = _FoldMLP(3, 30, 4, [g])
    x = torch.randn(4, 17, 3, generator=g)
    y = (torch.rand(4, 17, generator=g) > 0.5).float()
    w = (torch.rand(4, 17, generator=g) > 0.2).float()
    loss, grad = mlp._loss_and_grad(mlp.params, x, y, w, l2=1e-2)
    params = mlp.params.clone().requires_grad_()
    mlp._loss_and_grad(params, x, y, w, l2=1e-2)[0].sum().backward()
    assert (grad - params.grad).abs().max() < 1e-6 * max(1.0, float(grad.abs().max()))
    assert loss.shape == (4,)


def test_c2st_batched_scores_each_pair_as_c2st_does():
    """Several pairs train side by side, each fold leaving the batch when it converges. Each pair's score is the
    one c2st gives it, up to float rounding: on some machines a parameter's Adam update rounds differently at
    another position in the batch (measured on ten two_moons observations: up to 0.003 in an accuracy), while the
    last pair, at the end of the batch as c2st's folds are, matches exactly."""
    pairs = [gaussians(400, 2, shift, seed=seed) for seed, shift in enumerate((0.0, 0.5, 1.0, 3.0))]
    together = c2st_batched(pairs, seed=3, max_epochs=60)
    alone = [c2st(a, b, seed=3, max_epochs=60) for a, b in pairs]
    assert together[-1] == alone[-1]
    for one, other in zip(together, alone):
        assert abs(one.accuracy - other.accuracy) < 0.01
        assert sum(abs(e - f) for e, f in zip(one.epochs, other.epochs)) <= 10  # a fold may stop an epoch apart
        assert (one.num_samples, one.dim, one.threshold) == (other.num_samples, other.dim, other.threshold)
    assert together[0].accuracy < 0.58 and together[-1].accuracy > 0.9  # the same sets, and 3 sd apart
    assert [r.accuracy for r in c2st_batched(pairs[::-1], seed=3, max_epochs=60)][0] == together[-1].accuracy


def test_c2st_batched_checks_its_pairs():
    a, b = gaussians(40, 2, 0.0)
    with pytest.raises(ValueError, match="pairs must be a non-empty list"):
        c2st_batched([])
    with pytest.raises(ValueError, match=r"pairs\[1\] must be a \(samples_a, samples_b\) pair, got Tensor"):
        c2st_batched([(a, b), a])
    with pytest.raises(ValueError, match=r"shape of the first, \(40, 2\); pairs\[1\] has \(30, 2\)"):
        c2st_batched([(a, b), (a[:30], b[:30])])
    with pytest.raises(ValueError, match=r"pairs\[1\]: samples_a and samples_b must have the same number of samples"):
        c2st_batched([(a, b), (a, b[:30])])
    with pytest.raises(TypeError, match=r"pairs\[11\]\[1\] must have a floating-point dtype"):
        c2st_batched([(a, b)] * 11 + [(a, b.long())])


@pytest.mark.slow
def test_c2st_agrees_with_the_sklearn_reference_protocol():
    path = Path(__file__).parents[1] / "examples" / "c2st_reference_check.py"
    spec = importlib.util.spec_from_file_location("c2st_reference_check", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    for shift in (0.0, 1.0):
        a, b = gaussians(500, 2, shift, seed=4)
        ours = c2st(a, b).accuracy
        reference = example.reference_c2st(a.numpy(), b.numpy())
        assert abs(ours - reference) < 0.04, (shift, ours, reference)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((torch.randn(20, 2).numpy(), torch.randn(20, 2)), {}, TypeError, "samples_a must be a torch.Tensor"),
        ((torch.randn(20, 2), torch.ones(20, 2, dtype=torch.long)), {}, TypeError, "samples_b must have a floating"),
        ((torch.randn(20), torch.randn(20)), {}, ValueError, r"samples_a must have shape \(N, D\), got \(20,\)"),
        ((torch.randn(20, 2), torch.randn(20, 3)), {}, ValueError, "same dimension, got 2 and 3"),
        ((torch.randn(20, 2), torch.randn(30, 2)), {}, ValueError, "same number of samples.*20 and 30"),
        ((torch.tensor([[0.0, math.nan]] * 20), torch.randn(20, 2)), {}, ValueError, "20 rows with NaN"),
        ((torch.randn(3, 2), torch.randn(3, 2)), {}, ValueError, "too few samples for 5 folds.*got 3"),
        ((torch.randn(20, 2), torch.randn(20, 2)), {"folds": 1}, ValueError, "folds must be an int >= 2"),
        ((torch.randn(20, 2), torch.randn(20, 2)), {"threshold": 0.5}, ValueError, r"threshold must be a real number in \(0.5, 1\], got 0.5"),
        ((torch.randn(20, 2), torch.randn(20, 2)), {"batch_size": 0}, ValueError, "batch_size must be an int >= 1, got 0"),
        ((torch.randn(20, 2), torch.randn(20, 2)), {"max_epochs": 2.5}, TypeError, "max_epochs must be an int >= 1, got float 2.5"),
        ((torch.randn(20, 2), torch.randn(20, 2)), {"learning_rate": 0.0}, ValueError, "learning_rate must be a positive number, got 0.0"),
        ((torch.randn(20, 2), torch.randn(20, 2)), {"patience": -1}, ValueError, "patience must be an int >= 0, got -1"),
        ((torch.randn(20, 2), torch.randn(20, 2)), {"l2": math.nan}, ValueError, "l2 must be"),  # passed as 0.5 before
        ((torch.randn(20, 2), torch.randn(20, 2)), {"l2": -5.0}, ValueError, "l2 must be"),
        ((torch.randn(20, 2), torch.randn(20, 2)), {"tol": -1.0}, ValueError, "tol must be"),
        ((torch.randn(20, 2), torch.randn(20, 2)), {"seed": 1.7}, TypeError, "seed must be an int"),
        ((torch.randn(20, 2), torch.randn(20, 2)), {"seed": None}, TypeError, "seed must be an int"),
    ],
)
def test_c2st_rejects_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        c2st(*args, **kwargs)


# ---------------------------------------------------------------------------------------- SBC


def test_a_point_mass_is_told_apart_from_the_point_shifted_by_a_little():
    """Issue 14.8: z-scoring by a's zero standard deviation (replaced by 1) reported 0.500 here."""
    point = torch.full((500, 2), 3.0)
    result = c2st(point, point + 1e-3)
    assert result.accuracy > 0.95 and not result.passed
    assert c2st(point, point.clone()).accuracy == pytest.approx(0.5, abs=0.06)  # the same point: chance


def test_a_minibatch_of_padding_alone_does_not_turn_a_fold_into_nan():
    """Folds of 11 rows per set differ in size; the shorter ones are padded with weight-0 rows, and with batch_size=1
    a batch can hold padding alone: its fold divided by zero and scored 0.5 with NaN weights."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(11, 2, generator=generator)
    b = torch.randn(11, 2, generator=generator) + 5.0  # far apart: every fold separates them
    result = c2st(a, b, batch_size=1, max_epochs=50)
    assert min(result.fold_accuracies) > 0.9, result.fold_accuracies

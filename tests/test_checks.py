"""The one module of argument checks: a table of values each check accepts or refuses, and its wording."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sbiflows.checks import (
    as_float_tensor,
    check_bool,
    check_choice,
    check_finite,
    check_int,
    check_positive_number,
    check_real,
)


@pytest.mark.parametrize(
    "value,options,expected",
    [
        (3, {}, 3),
        (np.int64(3), {}, 3),
        (np.int32(-2), {}, -2),
        (None, {"optional": True}, None),
        (5, {"minimum": 5, "maximum": 5}, 5),
    ],
)
def test_check_int_accepts(value, options, expected):
    result = check_int(value, "n", **options)
    assert result == expected and (result is None or type(result) is int)


@pytest.mark.parametrize(
    "value,options,error,message",
    [
        (True, {}, TypeError, "n must be an int, got bool True"),
        (np.bool_(True), {}, TypeError, "n must be an int, got bool True"),
        (1.0, {}, TypeError, "n must be an int, got float 1.0"),
        ("3", {}, TypeError, "n must be an int, got str '3'"),
        (None, {}, TypeError, "n must be an int, got NoneType None"),
        (0, {"minimum": 1}, ValueError, "n must be an int >= 1, got 0"),
        (np.int64(-3), {"minimum": 1}, ValueError, "n must be an int >= 1, got -3"),
        (9, {"minimum": 2, "maximum": 8}, ValueError, r"n must be an int in \[2, 8\], got 9"),
        (9, {"maximum": 8}, ValueError, "n must be an int <= 8, got 9"),
        (0, {"minimum": 1, "optional": True}, ValueError, "n must be None or an int >= 1, got 0"),
        (0, {"minimum": 1, "optional": "the default rule"}, ValueError,
         r"n must be None \(the default rule\) or an int >= 1, got 0"),
    ],
)
def test_check_int_refuses(value, options, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        check_int(value, "n", **options)


@pytest.mark.parametrize(
    "value,options,error,message",
    [
        (0.0, {"low": 0, "low_open": True}, ValueError, "a must be a real number > 0, got 0.0"),
        (float("nan"), {}, ValueError, "a must be a real number, got nan"),
        (float("inf"), {"low": 0}, ValueError, "a must be a real number >= 0, got inf"),
        (1.0, {"low": 0, "high": 1, "high_open": True}, ValueError, r"a must be a real number in \[0, 1\), got 1.0"),
        (True, {}, TypeError, "a must be a real number, got bool True"),
        ("0.1", {}, TypeError, "a must be a real number, got str '0.1'"),
        (2, {"high": 1, "optional": True}, ValueError, "a must be None or a real number <= 1, got 2"),
    ],
)
def test_check_real_refuses(value, options, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        check_real(value, "a", **options)


@pytest.mark.parametrize("value", [0.5, np.float32(0.5), np.int64(1), 1])
def test_check_real_accepts_numpy_and_python_numbers(value):
    assert check_real(value, "a", low=0, high=1) == float(value)
    assert check_positive_number(value, "a") == float(value)


@pytest.mark.parametrize("value,error", [(0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                                         (True, TypeError), ("1", TypeError)])
def test_check_positive_number_refuses(value, error):
    with pytest.raises(error, match="t must be a positive number of seconds, got"):
        check_positive_number(value, "t", unit=" of seconds")


def test_check_bool_and_check_choice():
    assert check_bool(np.bool_(False), "flag") is False
    for value in (0, 1, "yes", None):
        with pytest.raises(TypeError, match="flag must be True or False, got"):
            check_bool(value, "flag")
    assert check_choice("l1", "distance", ("l2", "l1")) == "l1"
    for value in ("L1", None, 1):
        with pytest.raises(ValueError, match="distance must be one of 'l2', 'l1', got"):
            check_choice(value, "distance", ("l2", "l1"))


@pytest.mark.parametrize(
    "value,message",
    [
        ([1.0, 2.0], "x must be a torch.Tensor or a numpy array, got list"),
        (torch.ones(2, dtype=torch.int64), r"x must have a floating dtype, got torch.int64; convert it, e.g. x.float\(\)"),
        (np.ones(2, dtype=bool), "x must have a floating dtype, got torch.bool"),
    ],
)
def test_as_float_tensor_refuses(value, message):
    with pytest.raises(TypeError, match=message):
        as_float_tensor(value, "x", dtype=torch.float32, device="cpu")


def test_as_float_tensor_converts_and_detaches():
    leaf = torch.ones(2, dtype=torch.float64, requires_grad=True)
    out = as_float_tensor(leaf, "x", dtype=torch.float32, device=torch.device("cpu"))
    assert out.dtype == torch.float32 and not out.requires_grad
    assert as_float_tensor(np.zeros((2, 3)), "x", dtype=torch.float64, device="cpu").shape == (2, 3)


def test_check_finite_names_the_rows():
    assert check_finite(torch.zeros(3, 2), "x").shape == (3, 2)
    with pytest.raises(ValueError, match=r"x contains NaN or inf \(2 of 3 rows, first at row 1\)"):
        check_finite(torch.tensor([[0.0], [float("inf")], [float("nan")]]), "x")


def test_public_calls_name_a_bad_device_generator_empty_x_or_save_path(tmp_path, monkeypatch):
    """Found by an API audit: each of these raised a raw torch or Python error, or failed only at fit."""
    from torch.distributions import Independent, Normal

    from sbiflows import NPE, load

    prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    with pytest.raises(ValueError, match="device must be a torch device such as 'cpu' or 'cuda', got 'cud'"):
        NPE(prior, device="cud")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda', but this torch has no CUDA device"):
            NPE(prior, device="cuda")
    with monkeypatch.context() as one_gpu:  # a GPU number the machine does not have (as on a machine with one GPU)
        one_gpu.setattr(torch.cuda, "is_available", lambda: True)
        one_gpu.setattr(torch.cuda, "device_count", lambda: 1)
        with pytest.raises(ValueError, match=r"device='cuda:1', but this machine has 1 CUDA device\(s\), numbered "
                                             "from 0"):
            NPE(prior, device="cuda:1")
    theta = prior.sample((200,))
    posterior = NPE(prior, ensemble=1, transforms=1).fit(theta, theta, max_epochs=1, progress=False)
    with pytest.raises(TypeError, match="generator must be a torch.Generator .* got int"):
        posterior.sample(10, torch.zeros(2), generator=42)
    with pytest.raises(ValueError, match=r"must hold at least one observation of shape \(2,\), got shape \(0, 2\)"):
        posterior.sample_batched(10, torch.zeros(0, 2))
    with pytest.raises(ValueError, match="its folder .* does not exist"):
        posterior.save(tmp_path / "missing" / "p.pt")
    with pytest.raises(ValueError, match="is a folder; save to a file in it"):
        posterior.save(tmp_path)
    posterior.save(tmp_path / "p.pt")
    with pytest.raises(ValueError, match="map_location must be a torch device"):
        load(tmp_path / "p.pt", map_location="gpu0")


def test_plots_tarp_and_the_predictive_check_name_bad_truths_references_and_x_o(tmp_path):
    from torch.distributions import Independent, Normal

    from sbiflows import NPE, plots
    from sbiflows.diagnostics import posterior_predictive, tarp

    with pytest.raises(ValueError, match="truths contains NaN/inf values"):
        plots.corner(torch.randn(100, 2), truths=[0.0, float("nan")])
    with pytest.raises(ValueError, match="samples must hold at least 2 draws"):
        plots.corner(torch.randn(1, 2))
    prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    theta = prior.sample((200,))
    posterior = NPE(prior, ensemble=1, transforms=1).fit(theta, theta, max_epochs=1, progress=False)
    with pytest.raises(ValueError, match="references contains NaN or inf"):
        tarp(posterior, theta=theta[:100], x=theta[:100], references=torch.full((100, 2), float("nan")),
             num_posterior_samples=100)
    with pytest.raises(ValueError, match=r"x_o must have the posterior's x shape \(2,\), got \(3,\)"):
        posterior_predictive(posterior, lambda t: t, torch.zeros(3))
    with pytest.raises(TypeError, match="x_o must have a floating-point dtype"):
        posterior_predictive(posterior, lambda t: t, torch.zeros(2, dtype=torch.long))

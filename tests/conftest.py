"""Shared fixtures: every test is seeded, and no test may change torch's global defaults."""

import random

import numpy as np
import pytest
import torch

from gpu_device import DRY_RUN


def pytest_configure(config):
    """Small networks train fastest single-threaded; two xdist workers then use the two cores. Unless the command
    line says otherwise, xdist hands the workers one test at a time (``--maxschedchunk 1``): the slow tests run
    first (:func:`pytest_collection_modifyitems`) and spread over both workers instead of landing in the first
    worker's opening batch (an eighth of the suite, by xdist's default)."""
    torch.set_num_threads(1)
    if getattr(config.option, "maxschedchunk", 0) is None:  # xdist installed, the option not given
        config.option.maxschedchunk = 1


@pytest.fixture(autouse=True)
def seed_all():
    """Seed Python, NumPy and torch before every test."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def fresh_one_time_warnings():
    """Every test sees the once-per-process float64 warning afresh, whatever ran before it in its worker."""
    from sbiflows import checks

    checks._NARROWED.clear()
    yield


@pytest.fixture(autouse=True)
def guard_torch_defaults():
    """Fail a test that leaves torch's default dtype or device, or distributions' argument validation, changed
    (a library call that flips one of them would change every later computation of the user's process)."""
    defaults = (torch.get_default_dtype(), torch.get_default_device(), torch.distributions.Distribution._validate_args)
    yield
    after = (torch.get_default_dtype(), torch.get_default_device(), torch.distributions.Distribution._validate_args)
    for name, before, now in zip(("default dtype", "default device", "Distribution validation"), defaults, after):
        assert now == before, f"test changed torch's {name}: {before} -> {now}"


def pytest_collection_modifyitems(config, items):
    """Run the ``slow`` tests first, so that with ``-n 2`` the short ones fill the workers' last minutes instead
    of one long test running on alone; tests marked ``gpu`` need CUDA: without it they are reported as skipped,
    with the reason."""
    items.sort(key=lambda item: "slow" not in item.keywords)  # stable: the same order on every xdist worker
    if torch.cuda.is_available() or DRY_RUN:  # DRY_RUN: SBIFLOWS_GPU_TESTS_ON_CPU=1 runs them on the CPU
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

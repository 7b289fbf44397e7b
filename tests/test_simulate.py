"""Simulation in-process: reproducibility, failures as counted rows, the four regressions of issue 13."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

from sbiflows import SimulationError, simulate, simulate_from_prior
from sbiflows.engine.driver import BROKEN_AFTER

PRIOR = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)


def noisy(theta):
    return theta + torch.randn_like(theta)


def numpy_simulator(theta):
    theta = np.asarray(theta)
    return theta**2 + np.random.normal(size=theta.shape)


def seeded(theta, seed=None):
    g = torch.Generator().manual_seed(seed)
    return theta + torch.randn(theta.shape, generator=g)


@pytest.mark.parametrize("simulator", [noisy, numpy_simulator, seeded])
def test_reproducible_and_keeps_the_simulators_dtype(simulator):
    a = simulate_from_prior(simulator, PRIOR, 50, seed=3, batch_size=8)
    b = simulate_from_prior(simulator, PRIOR, 50, seed=3, batch_size=8)
    assert a.x.shape == (50, 2)
    assert a.x.dtype == (torch.float64 if simulator is numpy_simulator else torch.float32)
    assert torch.equal(a.theta, b.theta) and torch.equal(a.x, b.x)
    c = simulate_from_prior(simulator, PRIOR, 50, seed=4, batch_size=8)
    assert not torch.equal(a.x, c.x)


def test_seeds_handed_to_simulators_fit_in_32_bits():
    seen = []

    def record(theta, seed):
        seen.append(seed)
        np.random.seed(seed)  # refuses seeds of 2**32 and more
        return theta

    simulate(record, torch.zeros(40, 1), batch_size=4, seed=2**62 + 5)
    assert len(seen) == 10 and len(set(seen)) == 10 and all(0 <= s < 2**32 for s in seen)


def test_nan_outputs_are_counted_not_dropped():
    def sim(theta):
        x = theta.clone()
        x[theta[:, 0] > 1.0] = float("nan")
        return x

    result = simulate_from_prior(sim, PRIOR, 400, seed=0)
    expected = int((result.theta[:, 0] > 1.0).sum())
    assert expected > 0 and result.num_invalid == expected and len(result.x) == 400
    assert f"{expected} invalid" in result.summary() and not result.failures


def failing(theta):
    if (theta[:, 0] > 1.5).any():
        raise ArithmeticError("blew up")
    return theta * 2


def test_raising_rows_become_nan_with_a_summary_warning():
    with pytest.warns(UserWarning, match=r"failed \(ArithmeticError \d+; first at theta index \d+: ArithmeticError: "
                                         r"blew up\)"):
        result = simulate_from_prior(failing, PRIOR, 300, seed=0, batch_size=50)
    bad = result.theta[:, 0] > 1.5
    assert [f.index for f in result.failures] == torch.nonzero(bad).flatten().tolist()
    assert torch.isnan(result.x[bad]).all() and torch.isfinite(result.x[~bad]).all()
    torch.testing.assert_close(result.x[~bad], 2 * result.theta[~bad])


def noisy_failing(theta):
    if (theta[:, 0] > 1.5).any():
        raise ArithmeticError("blew up")
    return theta + torch.randn_like(theta)


@pytest.mark.parametrize("simulator", [noisy_failing])
def test_rows_of_a_failed_batch_get_their_own_noise(simulator):
    """Regression 1: every retried row was rerun with the batch's seed, so their noise was identical."""
    with pytest.warns(UserWarning, match="failed"):
        result = simulate_from_prior(simulator, PRIOR, 2000, seed=0, batch_size=100)
    bad = result.theta[:, 0] > 1.5
    chunks_with_failures = {int(i) // 100 for i in torch.nonzero(bad).flatten()}
    assert len(chunks_with_failures) > 5
    noise = (result.x - result.theta)[~bad]
    assert len(torch.unique(noise[:, 0])) == len(noise)  # no two rows share their noise
    for c in chunks_with_failures:
        rows = torch.arange(c * 100, (c + 1) * 100)
        rows = rows[~bad[rows]]
        assert float((result.x[rows] - result.theta[rows]).std(0).min()) > 0.5  # N(0, 1) noise


def test_a_value_error_from_the_simulator_is_a_failed_row_not_an_abort():
    """Regression 2: numpy's binomial raises ValueError for p outside [0, 1]; that aborted the whole run."""

    def binomial(theta):
        return np.random.binomial(10, np.asarray(theta[:, :1]) + 0.5)

    theta = torch.rand(200, 1)  # p = theta + 0.5 > 1 for about half the rows
    with pytest.warns(UserWarning, match="ValueError"):
        result = simulate(binomial, theta, batch_size=20)
    bad = theta[:, 0] + 0.5 > 1
    assert len(result.failures) == int(bad.sum()) > 0
    assert {f.error_type for f in result.failures} == {"ValueError"}
    assert torch.isfinite(result.x[~bad]).all() and torch.isnan(result.x[bad]).all()


def test_global_generators_are_left_as_they_were():
    """Regression 3: simulate reseeded the global generators, so a prior.sample() loop repeated itself."""
    torch.manual_seed(11)
    np.random.seed(11)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    simulate(numpy_simulator, torch.zeros(20, 2), batch_size=5)
    simulate(noisy, torch.zeros(20, 2), batch_size=5)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert np.array_equal(after[1], numpy_state[1]) and after[2] == numpy_state[2]
    draws = []
    for _ in range(3):
        theta = PRIOR.sample((4,))
        simulate(noisy, theta)
        draws.append(theta)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_wrong_shape_in_the_last_chunk_keeps_all_earlier_chunks():
    """Regression 4: a wrong-width batch at the end discarded every earlier one."""

    def widening(theta):
        return torch.zeros(len(theta), 3 if theta[0, 0] >= 90 else 2)

    with pytest.warns(UserWarning, match="BadOutput"):
        result = simulate(widening, torch.arange(100.0)[:, None], batch_size=10)
    assert torch.equal(result.x[:90], torch.zeros(90, 2)) and torch.isnan(result.x[90:]).all()
    assert [f.index for f in result.failures] == list(range(90, 100))
    assert "shape (3,) per row, but earlier chunks had (2,)" in result.failures[0].message


def test_non_numeric_and_wrong_row_count_outputs_are_failed_rows():
    def odd(theta):
        if theta[0, 0] == 0:
            return ["a"] * len(theta)
        if theta[0, 0] == 1:
            return torch.zeros(len(theta) + 1, 2)
        return torch.ones(len(theta), 2)

    with pytest.warns(UserWarning, match="BadOutput"):
        result = simulate(odd, torch.tensor([[0.0], [1.0], [2.0]]), batch_size=1)
    assert [f.error_type for f in result.failures] == ["BadOutput", "BadOutput"]
    assert "not numeric" in result.failures[0].message and "shape (2, 2) for 1 parameter sets" in result.failures[1].message
    assert torch.equal(result.x[2], torch.ones(2))


def test_whole_failed_batch_becomes_nan():
    theta = torch.zeros(30, 2)
    theta[:10, 0] = 2.0  # the whole first batch fails
    with pytest.warns(UserWarning, match="10 invalid"):
        result = simulate(failing, theta, batch_size=10)
    assert torch.isnan(result.x[:10]).all() and torch.isfinite(result.x[10:]).all()


def test_raise_mode_keeps_finished_simulations():
    theta = torch.zeros(100, 2)
    theta[60, 0] = 2.0
    with pytest.raises(SimulationError, match="theta index 60 failed with ArithmeticError") as info:
        simulate(failing, theta, batch_size=20, on_error="raise")
    assert info.value.index == 60 and info.value.partial.x.shape == (60, 2)


def batch_broken(theta):
    """Works for one row at a time only (raises for a batch), and fails for theta[:, 0] > 3 anyway."""
    if len(theta) > 1:
        raise RuntimeError("solver blew up")
    if theta[0, 0] > 3:
        raise ValueError("out of range")
    return theta


def test_calls_that_fail_as_a_whole_while_every_row_works_alone_are_named_in_a_warning():
    """The row-by-row fallback was silent: a broken batch path cost batch_size times the calls unseen."""
    theta = torch.arange(80.0).reshape(40, 2) / 20  # theta[:, 0] from 0 to 3.9: rows 31.. also fail alone
    with pytest.warns(UserWarning) as caught:
        result = simulate(batch_broken, theta, batch_size=10)
    messages = [str(w.message) for w in caught]
    named = [m for m in messages if "failed as a whole" in m]
    assert len(named) == 1 and named[0].startswith("every simulator call of several rows failed as a whole (3 calls; "
                                                   "RuntimeError: solver blew up) although each of their rows")
    assert "needs vectorized=False" in named[0] and result.num_invalid == 9  # the last chunk: its rows fail alone
    with pytest.warns(UserWarning, match="9 invalid") as caught:  # rows that fail alone: the usual isolation
        simulate(batch_broken, theta[30:], batch_size=10)
    assert not any("failed as a whole" in str(w.message) for w in caught)


def rarely_fails(theta):
    """A batch simulator whose call fails when its first row is one of a few parameter sets (a row that fails
    by chance), and works for every row alone."""
    if len(theta) > 1 and float(theta[0, 0]) in (0.0, 1.0):
        raise FloatingPointError("solver diverged")
    return theta


def test_a_call_that_fails_by_chance_among_calls_that_work_is_not_called_a_broken_batch_path():
    theta = torch.arange(80.0).reshape(40, 2) / 20  # the chunks of 10 rows start at 0, 1, 2 and 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all: the isolated rows all succeed
        result = simulate(rarely_fails, theta, batch_size=10)
    assert result.num_invalid == 0


def test_a_simulator_that_cannot_run_stops_early_with_its_exception():
    calls = []

    def broken(theta):
        calls.append(len(theta))
        raise ValueError("unknown option 'tau'")

    with pytest.raises(SimulationError, match=r"first 20 simulations all failed with ValueError: unknown option 'tau'"):
        simulate(broken, torch.zeros(10_000, 2), batch_size=100)
    assert len(calls) == 1 + BROKEN_AFTER  # the chunk, then one row at a time until twenty have failed


def test_an_undeclared_per_row_simulator_gets_a_message_saying_how_to_declare_it():
    def one_parameter_set(theta):
        a, b = theta  # written for theta of shape (2,)
        return torch.stack([a + b, a - b])

    with pytest.raises(SimulationError, match=r"batch theta of shape \(N, theta_dim\).*vectorized=False"):
        simulate(one_parameter_set, torch.randn(50, 2), batch_size=10)
    result = simulate(one_parameter_set, torch.randn(50, 2), batch_size=10, vectorized=False)
    assert result.x.shape == (50, 2) and not result.failures


def test_per_row_simulators_are_seeded_per_row_and_keep_failed_rows_apart():
    def one(theta, seed):
        if theta[0] > 1.5:
            raise RuntimeError("diverged")
        return theta + torch.randn(2, generator=torch.Generator().manual_seed(seed))

    theta = PRIOR.sample((60,))
    with pytest.warns(UserWarning):
        a = simulate(one, theta, batch_size=7, vectorized=False, seed=1)
    bad = theta[:, 0] > 1.5
    assert [f.index for f in a.failures] == torch.nonzero(bad).flatten().tolist()
    noise = (a.x - theta)[~bad]
    assert len(torch.unique(noise[:, 0])) == len(noise)


def test_bad_arguments_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="on_error"):
        simulate(noisy, torch.zeros(5, 2), on_error="ignore")
    with pytest.raises(TypeError, match="theta must be a torch.Tensor of shape \\(N, theta_dim\\), got ndarray"):
        simulate(noisy, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="theta must be a non-empty tensor"):
        simulate(noisy, torch.zeros(0, 2))
    with pytest.raises(ValueError, match=r"theta contains NaN or inf \(1 of 5 rows, first at row 3\)"):
        simulate(noisy, torch.zeros(5, 2).index_fill_(0, torch.tensor([3]), float("nan")))
    with pytest.raises(ValueError, match="num_simulations must be an int >= 1"):
        simulate_from_prior(noisy, PRIOR, 0)
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        simulate(noisy, torch.zeros(5, 2), workers=0)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        simulate(noisy, torch.zeros(5, 2), timeout=-1)
    with pytest.raises(TypeError, match="executor must be a concurrent.futures.Executor"):
        simulate(noisy, torch.zeros(5, 2), executor="dask")
    with pytest.raises(TypeError, match="batch_size must be an int"):
        simulate(noisy, torch.zeros(5, 2), batch_size=2.5)
    with pytest.raises(SimulationError, match="all 2 simulations failed|first 2 simulations all failed"):
        simulate(lambda t: 1 / 0, torch.zeros(2, 2))


@pytest.mark.parametrize("simulator", [noisy, seeded])
def test_simulator_noise_is_independent_of_the_prior_draws(simulator):
    """One seed drives the prior and the simulator; their streams must not coincide (they did: x = 2 theta)."""
    result = simulate_from_prior(simulator, PRIOR, 2000, seed=0, batch_size=500)
    noise = result.x - result.theta
    for j in range(2):
        corr = torch.corrcoef(torch.stack([noise[:, j], result.theta[:, j]]))[0, 1]
        assert abs(float(corr)) < 0.1, (j, float(corr))  # null sd ~0.022; the bug gave 1.0


def test_task_simulate_does_not_reuse_a_same_seeded_prior_stream():
    import simulators

    task = simulators.get("gaussian_linear")
    torch.manual_seed(3)
    theta = task.prior.sample((2000,))
    noise = task.simulate(theta, seed=3) - theta
    corr = torch.corrcoef(torch.stack([noise[:, 0], theta[:, 0]]))[0, 1]
    assert abs(float(corr)) < 0.1, float(corr)


def test_progress_in_a_log_file_is_plain_lines_with_rate_eta_and_failures(monkeypatch):
    import io

    from sbiflows.engine import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    stream = io.StringIO()  # not a terminal, like a batch job's log
    bar = progress.Progress(100, enabled=True, stream=stream)
    bar.update(40, failed=3)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    assert lines[0].startswith("simulating: 40/100 rows (40%)") and "rows/s, ETA" in lines[0]
    assert lines[0].endswith("3 failed")
    assert lines[1].startswith("simulating: 40/100 rows (40%)")  # closed early (Ctrl-C): where it stopped
    stream = io.StringIO()
    bar = progress.Progress(100, enabled=True, initial=60, stream=stream)
    bar.update(40, failed=2)
    bar.close()  # finished: no rate or ETA, but how long it took and what the store held
    assert stream.getvalue().splitlines()[-1].startswith(
        "simulating: 100/100 rows (100%, 60 read from the store), finished in ") and "ETA" not in stream.getvalue()
    assert stream.getvalue().splitlines()[-1].endswith("2 failed")


def test_a_per_row_chunk_whose_rows_all_fail_is_not_run_twice():
    calls = []

    def one(theta):
        calls.append(1)
        if theta[0] > 0:
            raise RuntimeError(f"bad {float(theta[0])}")
        return theta

    theta = torch.tensor([[1.0], [2.0], [3.0], [-1.0], [-2.0], [-3.0]])
    with pytest.warns(UserWarning, match="RuntimeError 3"):
        result = simulate(one, theta, batch_size=3, vectorized=False)
    assert len(calls) == 6  # each row once
    assert [f.message for f in result.failures] == ["bad 1.0", "bad 2.0", "bad 3.0"]


def test_a_torch_module_simulator_runs_and_is_not_handed_a_seed():
    """``nn.Module.__call__`` takes ``**kwargs``, so every module counted as taking ``seed``: its forward got
    ``seed=`` and the run stopped as "cannot run" (advising vectorized=False)."""

    class Module(torch.nn.Module):
        def forward(self, theta):
            return 2 * theta + 0.1 * torch.randn_like(theta)

    class SeededModule(torch.nn.Module):
        def forward(self, theta, seed):
            return theta + torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed))

    result = simulate(Module(), torch.zeros(30, 2), batch_size=5)
    assert result.num_invalid == 0 and result.x.shape == (30, 2)
    seeded_run = simulate(SeededModule(), torch.zeros(6, 2), batch_size=3, seed=1)
    assert torch.equal(seeded_run.x, simulate(SeededModule(), torch.zeros(6, 2), batch_size=3, seed=1).x)


def test_simulate_from_prior_refuses_a_prior_of_matrices_before_simulating():
    """Its draws of shape (N, 2, 3) were simulated in memory (simulate refuses such theta) and crashed a store
    after the first chunk."""
    calls = []
    prior = Independent(Normal(torch.zeros(2, 3), torch.ones(2, 3)), 2)
    with pytest.raises(ValueError, match=r"prior must have event shape \(D,\) .* got event shape \(2, 3\)"):
        simulate_from_prior(lambda t: calls.append(t) or t, prior, 5)
    assert calls == []
    scalar = simulate_from_prior(lambda t: 2 * t, Normal(0.0, 1.0), 4)  # a scalar prior: one parameter
    assert scalar.theta.shape == (4, 1)


def test_parameters_that_require_grad_simulate_alike_with_and_without_a_store(tmp_path):
    """With a store, ``theta.numpy()`` raised "Can't call numpy() on Tensor that requires grad"."""
    theta = torch.rand(6, 2, requires_grad=True)
    stored = simulate(lambda t: 2 * t, theta, store=tmp_path / "s.zarr", batch_size=4)
    assert torch.equal(stored.x, simulate(lambda t: 2 * t, theta).x.detach())


def exits_on_two(theta):
    if (theta[:, 0] == 2).any():
        raise SystemExit(2)  # a wrapped command-line tool that exits on bad parameters, or a SIGTERM handler
    return theta * 2


def test_sys_exit_stops_an_in_process_run_keeping_what_finished_and_is_a_failed_row_in_a_worker(tmp_path):
    """sys.exit is a request to stop (a SIGTERM handler calls it): in-process it stops the run as Ctrl-C does, with
    the finished chunks in the store; in a worker process it is that worker's death, a counted row."""
    from sbiflows import load_simulations

    with pytest.raises(SystemExit):
        simulate(exits_on_two, torch.arange(6.0)[:, None], batch_size=2, store=tmp_path / "s.zarr")
    with pytest.warns(UserWarning, match="incomplete: 2 of 6 rows"):
        assert torch.equal(load_simulations(tmp_path / "s.zarr").x, torch.tensor([[0.0], [2.0]]))
    with pytest.warns(UserWarning, match="WorkerDied"):
        result = simulate(exits_on_two, torch.arange(6.0)[:, None], batch_size=2, timeout=60)
    assert [(f.index, f.error_type) for f in result.failures] == [(2, "WorkerDied")]


def test_bfloat16_outputs_are_simulations_as_float16_ones_are():
    """``Tensor.numpy()`` refuses bfloat16, which made every row 'not numeric' and stopped the run."""
    for dtype in (torch.float16, torch.bfloat16):
        result = simulate(lambda t: t.to(dtype) * 2, torch.arange(4.0)[:, None])
        assert result.x.dtype == torch.float32 and torch.equal(result.x, 2 * torch.arange(4.0)[:, None]), dtype


def test_simulate_from_prior_checks_its_options_before_drawing_the_parameters():
    """The options were checked after the prior had been sampled for every row (seconds for millions of draws, far
    more for a rejection prior)."""
    class Counting(Independent):
        draws = 0

        def sample(self, shape=torch.Size()):
            Counting.draws += 1
            return super().sample(shape)

    prior = Counting(Normal(torch.zeros(2), torch.ones(2)), 1)
    for options, error, match in (({"workers": 0}, ValueError, "workers must be an int >= 1, got 0"),
                                  ({"on_error": "ignore"}, ValueError, "on_error"),
                                  ({"timeout": -1}, ValueError, "timeout must be a positive number"),
                                  ({"wokers": 2}, TypeError, r"unexpected keyword arguments \['wokers'\]")):
        with pytest.raises(error, match=match):
            simulate_from_prior(noisy, prior, 10, **options)
    with pytest.raises(TypeError, match="simulator must be callable, got str"):
        simulate_from_prior("noisy", prior, 10)
    assert Counting.draws == 0


def test_a_thread_pool_leaves_the_callers_global_generators_as_they_were():
    """Calls on threads seed and restore the global generators concurrently, so one call's restore could leave
    another's seed behind, and the caller's later prior draws changed."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(123)
    np.random.seed(123)
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    with ThreadPoolExecutor(4) as pool, pytest.warns(UserWarning, match="not reproducible on a ThreadPoolExecutor"):
        simulate(lambda t: t + torch.randn(t.shape) + np.random.normal(), torch.zeros(200, 2), batch_size=1,
                 executor=pool)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)

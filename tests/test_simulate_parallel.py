"""Simulation in worker processes, on executors and on Dask: same numbers, timeouts that kill, deaths survived."""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

from sbiflows import SimulationError, simulate, simulate_from_prior
from processes import bitwise_equal, wait_for_exit

PRIOR = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)


def seeded_with_failures(theta, seed):
    """A seeded simulator that raises for theta_0 > 1.5 (about 7% of rows), so retries are exercised too."""
    if (theta[:, 0] > 1.5).any():
        raise ValueError("p outside [0, 1]")
    g = torch.Generator().manual_seed(seed)
    return theta + torch.randn(theta.shape, generator=g)


def global_numpy(theta):
    theta = np.asarray(theta)
    return theta + np.random.normal(size=theta.shape)


def sleepy(theta, seed, *, marker=None):
    """Sleeps forever on theta_0 > 2 after writing its pid; otherwise returns at once."""
    if (theta[:, 0] > 2.0).any():
        Path(os.environ["SBIFLOWS_TEST_PID_DIR"], f"{os.getpid()}").write_text("")
        time.sleep(10_000)
    return theta * 2


def deadly(theta, seed):
    """Kills its own process on theta_0 > 2 (a segfault, an out-of-memory kill)."""
    if (theta[:, 0] > 2.0).any():
        os.kill(os.getpid(), signal.SIGKILL)
    return theta * 2


@pytest.fixture(scope="module")
def reference():
    with pytest.warns(UserWarning, match="ValueError"):
        return simulate_from_prior(seeded_with_failures, PRIOR, 400, seed=5, batch_size=25)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["workers1", "workers2", "threads", "processes", "timeout"])
def test_same_numbers_whatever_runs_them(reference, how, tmp_path):
    options = {
        "workers1": {"workers": 1},
        "workers2": {"workers": 2},
        "threads": {"executor": ThreadPoolExecutor(2)},
        "processes": {"executor": ProcessPoolExecutor(2)},
        "timeout": {"timeout": 60.0, "store": tmp_path / "sims.zarr"},
    }[how]
    with pytest.warns(UserWarning, match="ValueError"):
        result = simulate_from_prior(seeded_with_failures, PRIOR, 400, seed=5, batch_size=25, **options)
    assert torch.equal(result.theta, reference.theta)
    assert bitwise_equal(result.x, reference.x)
    assert [(f.index, f.error_type) for f in result.failures] == [(f.index, f.error_type) for f in reference.failures]
    if "executor" in options:
        options["executor"].shutdown()


@pytest.mark.slow
def test_global_generator_simulators_match_in_process_and_in_worker_processes():
    a = simulate_from_prior(global_numpy, PRIOR, 300, seed=2, batch_size=30)
    b = simulate_from_prior(global_numpy, PRIOR, 300, seed=2, batch_size=30, workers=2)
    assert torch.equal(a.x, b.x)


@pytest.mark.slow
def test_a_hung_simulation_is_killed_and_the_run_finishes(tmp_path, monkeypatch):
    monkeypatch.setenv("SBIFLOWS_TEST_PID_DIR", str(tmp_path))
    theta = torch.zeros(40, 2)
    theta[13, 0] = 3.0
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="TimeoutError 1"):
        result = simulate(sleepy, theta, batch_size=10, workers=2, timeout=3.0)
    assert time.perf_counter() - start < 60
    assert [(f.index, f.error_type) for f in result.failures] == [(13, "TimeoutError")]
    assert "killed" in result.failures[0].message
    assert torch.isnan(result.x[13]).all() and torch.equal(result.x[14:], 2 * theta[14:])
    pids = [int(p.name) for p in tmp_path.iterdir()]
    assert len(pids) == 2  # the chunk call and the row retried alone
    assert not wait_for_exit(pids)  # the hung work is gone, not left running


def slow_or_broken(theta, seed):
    """Records each call; takes 2 s on theta_0 > 2, raises on theta_0 < -2; otherwise returns at once."""
    Path(os.environ["SBIFLOWS_TEST_PID_DIR"], f"call_{time.time_ns()}").write_text("")
    if (theta[:, 0] > 2.0).any():
        time.sleep(2.0)
    if (theta[:, 0] < -2.0).any():
        raise ValueError("no steady state")
    return theta * 2


@pytest.mark.parametrize("limit", [0.5, 0.5000001])  # the second is shown as "0.5 s"; it was taken as longer
def test_rows_that_timed_out_run_again_only_under_a_longer_limit(tmp_path, monkeypatch, limit):
    calls = tmp_path / "calls"
    calls.mkdir()
    monkeypatch.setenv("SBIFLOWS_TEST_PID_DIR", str(calls))
    theta = torch.zeros(4, 2)
    theta[1, 0], theta[2, 0] = 3.0, -3.0
    store = tmp_path / "sims.zarr"
    with pytest.warns(UserWarning, match="TimeoutError 1"):
        first = simulate(slow_or_broken, theta, batch_size=4, timeout=limit, store=store)
    assert {(f.index, f.error_type) for f in first.failures} == {(1, "TimeoutError"), (2, "ValueError")}
    before = len(list(calls.iterdir()))
    with pytest.warns(UserWarning, match="TimeoutError 1"):
        same = simulate(slow_or_broken, theta, batch_size=4, timeout=limit, store=store)  # same limit: kept
    assert len(list(calls.iterdir())) == before and same.reused == 4
    with pytest.warns(UserWarning, match="TimeoutError 1"):  # no limit now: kept, since nothing could stop a
        unlimited = simulate(slow_or_broken, theta, batch_size=4, store=store)  # row that hangs again
    assert len(list(calls.iterdir())) == before and unlimited.reused == 4
    with pytest.warns(UserWarning, match="ValueError 1"):
        longer = simulate(slow_or_broken, theta, batch_size=4, timeout=30.0, store=store)
    assert len(list(calls.iterdir())) == before + 1  # only the row that timed out ran again
    assert [(f.index, f.error_type) for f in longer.failures] == [(2, "ValueError")]
    assert torch.equal(longer.x[1], 2 * theta[1]) and longer.reused == 3
    with pytest.warns(UserWarning, match="4 read from the store"):  # and it is stored
        assert simulate(slow_or_broken, theta, batch_size=4, store=store).num_invalid == 1


@pytest.mark.slow
def test_timeout_in_process_runs_one_killable_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("SBIFLOWS_TEST_PID_DIR", str(tmp_path))
    theta = torch.zeros(4, 2)
    theta[0, 0] = 3.0
    with pytest.warns(UserWarning, match="TimeoutError"):
        result = simulate(sleepy, theta, batch_size=1, timeout=2.0)
    assert [f.index for f in result.failures] == [0]


@pytest.mark.slow
def test_a_worker_that_dies_is_replaced_and_the_row_that_kills_it_fails():
    theta = torch.zeros(30, 2)
    theta[7, 0] = 3.0
    with pytest.warns(UserWarning, match="WorkerDied 1"):
        result = simulate(deadly, theta, batch_size=10, workers=2)
    assert [(f.index, f.error_type) for f in result.failures] == [(7, "WorkerDied")]
    assert "SIGKILL" in result.failures[0].message
    mask = torch.ones(30, dtype=torch.bool)
    mask[7] = False
    assert torch.equal(result.x[mask], 2 * theta[mask])


@pytest.mark.slow
def test_a_lambda_runs_in_worker_processes_and_a_process_pool_names_the_fix():
    result = simulate(lambda t: t + 1, torch.zeros(6, 1), batch_size=2, workers=2)
    assert torch.equal(result.x, torch.ones(6, 1))
    with ProcessPoolExecutor(1) as pool, pytest.raises(TypeError, match="cannot pickle the simulator.*workers=N"):
        simulate(lambda t: t + 1, torch.zeros(6, 1), executor=pool)
    import threading

    lock = threading.Lock()
    with pytest.raises(TypeError, match="cannot be sent to worker processes"):
        simulate(lambda t: t if lock else t, torch.zeros(6, 1), workers=2)
    pickle.dumps(seeded_with_failures)  # module-level simulators pickle by reference


@pytest.mark.slow
def test_threads_warn_that_global_generator_simulators_are_not_reproducible():
    with ThreadPoolExecutor(2) as pool, pytest.warns(UserWarning, match="threads share"):
        simulate(global_numpy, torch.zeros(6, 2), executor=pool)


@pytest.mark.slow
def test_simulate_broken_in_a_worker_stops_early():
    with pytest.raises(SimulationError, match="cannot run"):
        simulate(lambda t: 1 / 0, torch.zeros(500, 2), batch_size=10, workers=2)


def pid_and_setting(theta, seed):
    """The worker's pid and the value of an environment variable, per row."""
    value = float(os.environ.get("SBIFLOWS_TEST_SETTING", "0"))
    return torch.tensor([[float(os.getpid()), value]] * len(theta))


@pytest.mark.slow
def test_worker_processes_are_reused_by_the_next_run_and_follow_its_environment(monkeypatch):
    first = simulate(pid_and_setting, torch.zeros(8, 1), batch_size=2, workers=2)
    monkeypatch.setenv("SBIFLOWS_TEST_SETTING", "7")
    second = simulate(pid_and_setting, torch.zeros(8, 1), batch_size=2, workers=2)
    assert set(second.x[:, 0].tolist()) <= set(first.x[:, 0].tolist())  # no new process started
    assert set(second.x[:, 1].tolist()) == {7.0} and set(first.x[:, 1].tolist()) == {0.0}
    other = simulate(lambda t: t + 1, torch.zeros(4, 1), batch_size=2, workers=2)  # another simulator, same processes
    assert torch.equal(other.x, torch.ones(4, 1))


@pytest.mark.slow
def test_an_idle_worker_that_died_is_replaced_by_the_next_run():
    from sbiflows.engine import backends

    first = simulate(pid_and_setting, torch.zeros(4, 1), batch_size=2, workers=2)
    for pid in set(first.x[:, 0].tolist()):
        os.kill(int(pid), signal.SIGKILL)  # killed while idle (out of memory, an admin)
    assert not wait_for_exit({int(p) for p in first.x[:, 0].tolist()})
    second = simulate(pid_and_setting, torch.zeros(4, 1), batch_size=2, workers=2)
    assert not second.failures and not set(second.x[:, 0].tolist()) & set(first.x[:, 0].tolist())
    backends.close_idle_workers()


@pytest.mark.slow
def test_a_reloaded_simulator_module_is_not_run_by_idle_workers_of_its_old_code(tmp_path, monkeypatch):
    """A module-level simulator is sent by reference: after the user edits and reloads its module, the workers
    kept idle from the last run would still run the old code (into new stores too)."""
    import importlib

    from sbiflows.engine import backends

    source = tmp_path / "edited_simulator.py"
    source.write_text("import os\ndef sim(theta, seed):\n    return theta + 1 + 0 * os.getpid()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("edited_simulator")
    try:
        assert torch.equal(simulate(module.sim, torch.zeros(4, 1), batch_size=2, workers=2).x, torch.ones(4, 1))
        source.write_text("import os\ndef sim(theta, seed):\n    return theta + 100 + 0 * os.getpid()\n")
        os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))  # a later mtime even on a coarse clock
        importlib.reload(module)
        assert torch.equal(simulate(module.sim, torch.zeros(4, 1), batch_size=2, workers=2).x, 100 * torch.ones(4, 1))
        assert torch.equal(simulate(module.sim, torch.zeros(2, 1), timeout=60).x, 100 * torch.ones(2, 1))
        # a module the kept workers first import after they started (a second simulator) is watched too
        later = tmp_path / "later_simulator.py"
        later.write_text("def sim(theta, seed):\n    return theta + 7\n")
        second = importlib.import_module("later_simulator")
        assert torch.equal(simulate(second.sim, torch.zeros(2, 1), timeout=60).x, 7 * torch.ones(2, 1))
        later.write_text("def sim(theta, seed):\n    return theta + 8\n")
        os.utime(later, ns=(time.time_ns(), time.time_ns() + 10**9))
        importlib.reload(second)
        assert torch.equal(simulate(second.sim, torch.zeros(2, 1), timeout=60).x, 8 * torch.ones(2, 1))
    finally:
        sys.modules.pop("edited_simulator", None)
        sys.modules.pop("later_simulator", None)
        backends.close_idle_workers()


def test_a_thread_executor_runs_a_simulator_that_cannot_be_pickled():
    """Threads share the simulator object: one holding a lock needs no pickling there."""
    import threading

    lock = threading.Lock()

    def locked(theta, seed):
        with lock:
            return theta + 1

    with ThreadPoolExecutor(2) as pool:
        result = simulate(locked, torch.zeros(6, 1), batch_size=2, executor=pool)
    assert torch.equal(result.x, torch.ones(6, 1))


def slow_row(theta):
    time.sleep(0.5)
    return theta


@pytest.mark.slow
def test_a_sandbox_killed_or_released_by_another_thread_mid_job_closes_each_pipe_once():
    """An aborted run kills its workers while their threads still read from them (CI once saw EBADF here)."""
    import threading

    import cloudpickle

    from sbiflows.engine.jobs import WORKER_DIED, Job
    from sbiflows.engine.sandbox import Sandbox

    box = Sandbox(cloudpickle.dumps(slow_row), vectorized=True, seeded=False)
    job = Job(chunk=0, start=0, theta=torch.ones(2, 1), seeds=(0,))
    assert np.array_equal(box.run(job, timeout=60).x, np.ones((2, 1)))  # started and loaded
    for stop in (box.kill, box.release):
        outcomes = []
        thread = threading.Thread(target=lambda: outcomes.append(box.run(job, timeout=60)))
        thread.start()
        time.sleep(0.2)  # the job is running in the child
        pid = box._process.pid
        stop()  # from this thread, while the other one waits on the pipe
        thread.join(10)
        if stop == box.kill:
            assert outcomes[0].errors[0][1] == WORKER_DIED
        else:  # released: the job finishes, then the pipes close and the child exits
            assert np.array_equal(outcomes[0].x, np.ones((2, 1)))
            box.reap()
        assert not wait_for_exit({pid}) and not box.alive
        assert np.array_equal(box.run(job, timeout=60).x, np.ones((2, 1)))  # a fresh child serves the next job
    box.close()


def test_a_per_row_timeout_beyond_what_a_pipe_poll_takes_is_waited_in_slices():
    """A per-row job waits ``timeout`` per row: 1,000 rows of 3,600 s overflowed ``Connection.poll``."""
    result = simulate(lambda t: 2 * t, torch.ones(1000, 2), vectorized=False, timeout=3600.0)
    assert result.num_invalid == 0 and torch.equal(result.x, 2 * torch.ones(1000, 2))


class _LoadsSlowly:
    """A simulator whose unpickling sleeps in a worker process (started as ``python -c``): an import that hangs."""

    def __reduce__(self):
        return _load_slowly, ()

    def __call__(self, theta):
        return 2 * theta


def _load_slowly():
    if sys.argv[0] == "-c":
        time.sleep(60)
    return _LoadsSlowly()


def test_a_simulator_whose_loading_hangs_fails_the_run_at_the_load_limit(monkeypatch):
    """Loading the simulator in a worker process waited without limit: a run with ``timeout=2`` whose simulator's
    import hung in new processes hung with it (here for the 60 s of the sleep; for good where an import never
    returns)."""
    from sbiflows.engine import sandbox

    monkeypatch.setattr(sandbox, "LOAD_TIMEOUT", 1.0)
    with pytest.raises(sandbox.SandboxStartError, match="did not finish loading it within 2 s"):
        simulate(_LoadsSlowly(), torch.ones(8, 2), batch_size=4, workers=2, timeout=2.0)


def test_a_stopped_run_cancels_the_chunks_it_queued_on_a_users_executor():
    """A run that stopped left its queued chunks in the user's executor, which simulated them after the stop."""
    calls = []

    def fails_first(theta, seed):
        calls.append(int(theta[0, 0]))
        if theta[0, 0] == 0:
            raise ValueError("bad row")
        time.sleep(1.0)  # chunks 1 and 2 run while the run stops; chunk 3 waits in the executor's queue
        return theta

    executor = ThreadPoolExecutor(max_workers=2)
    with pytest.raises(SimulationError, match="bad row"):
        simulate(fails_first, torch.arange(8.0)[:, None].repeat(1, 2), batch_size=1, executor=executor,
                 on_error="raise")
    executor.shutdown(wait=True)
    assert 0 in calls and 3 not in calls


def dies_on_two(theta, seed):
    if (theta[:, 0] == 2).any():
        os._exit(3)  # a native crash of the pool's worker
    return theta * 2


@pytest.mark.slow
def test_a_process_pool_that_breaks_gives_the_advice_also_when_the_next_chunk_is_submitted():
    """Once its pool broke, ``executor.submit`` itself raised BrokenProcessPool, past the advice that a result's
    failure gets."""
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1) as pool:
        with pytest.raises(BrokenProcessPool):  # a chunk of another call broke it
            pool.submit(dies_on_two, torch.full((1, 1), 2.0), 0).result()
        with pytest.raises(RuntimeError, match="process pool broke.*workers=N"):
            simulate(dies_on_two, torch.arange(12.0)[:, None], batch_size=2, executor=pool)

"""The resumable store: resume after SIGKILL and Ctrl-C, extension, refusal of another run, corruption, Dask."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

from sbiflows import SimulationError, SimulationInterrupted, load_simulations, simulate, simulate_from_prior
from sbiflows.simulate import StoreMismatchError
from processes import bitwise_equal, wait_for_exit

PRIOR = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)


def seeded(theta, seed):
    return theta + torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed))


def other(theta, seed):
    return theta


def test_a_rerun_reads_the_store_and_simulates_nothing(tmp_path):
    store = tmp_path / "sims.zarr"
    first = simulate_from_prior(seeded, PRIOR, 100, seed=1, batch_size=10, store=store)
    calls = []

    def counting(theta, seed):
        calls.append(1)
        return seeded(theta, seed)

    counting.__qualname__ = seeded.__qualname__  # the same simulator, counted
    again = simulate_from_prior(counting, PRIOR, 100, seed=1, batch_size=10, store=store)
    assert not calls and again.reused == 100 and bitwise_equal(again.x, first.x)
    loaded = load_simulations(store)
    assert loaded.complete and bitwise_equal(loaded.x, first.x) and torch.equal(loaded.theta, first.theta)
    assert "100 simulations" in loaded.summary()


def test_numpy_integers_for_the_seed_and_chunk_size_store_and_resume_as_ints(tmp_path):
    """NumPy integers pass the argument checks, so the store (JSON) gets them as ints: the run is the same."""
    store = tmp_path / "sims.zarr"
    first = simulate_from_prior(seeded, PRIOR, 30, seed=np.int64(1), batch_size=np.int64(10), store=store)
    again = simulate_from_prior(seeded, PRIOR, 30, seed=1, batch_size=10, store=store)
    assert again.reused == 30 and bitwise_equal(again.x, first.x)

def test_more_simulations_extend_the_store_with_the_same_seed_plan(tmp_path):
    store = tmp_path / "sims.zarr"
    simulate_from_prior(seeded, PRIOR, 95, seed=1, batch_size=10, store=store)  # last chunk 5 rows
    extended = simulate_from_prior(seeded, PRIOR, 230, seed=1, batch_size=10, store=store)
    direct = simulate_from_prior(seeded, PRIOR, 230, seed=1, batch_size=10)
    assert extended.reused == 90 and bitwise_equal(extended.x, direct.x) and torch.equal(extended.theta, direct.theta)
    fewer = simulate_from_prior(seeded, PRIOR, 50, seed=1, batch_size=10, store=store)
    assert fewer.reused == 50 and bitwise_equal(fewer.x, direct.x[:50])


@pytest.mark.parametrize("change", ["seed", "batch_size", "simulator", "prior", "dtype"])
def test_a_store_of_another_run_is_refused_not_mixed(tmp_path, change):
    store = tmp_path / "sims.zarr"
    simulate_from_prior(seeded, PRIOR, 40, seed=1, batch_size=10, store=store)
    args = {"simulator": seeded, "prior": PRIOR, "seed": 1, "batch_size": 10}
    args.update({
        "seed": {"seed": 2},
        "batch_size": {"batch_size": 20},
        "simulator": {"simulator": other},
        "prior": {"prior": Independent(Normal(torch.ones(2), torch.ones(2)), 1)},
        "dtype": {"simulator": lambda theta, seed: seeded(theta, seed).double() + 1e-12},  # float32 would round
    }[change])
    if change == "dtype":
        args["simulator"].__qualname__ = seeded.__qualname__
    match = {"seed": "seed=1", "batch_size": "batch_size=10", "simulator": "simulator=",
             "prior": "other parameters", "dtype": "dtype float32"}[change]
    with pytest.raises(StoreMismatchError, match=match):
        simulate_from_prior(args.pop("simulator"), args.pop("prior"), 60, store=store, **args)  # x: on new chunks


SHAPE_BUG = {"on": True}


def shape_of_rows_from_200(theta):
    """x = theta, but (while ``SHAPE_BUG["on"]``) a chunk whose first parameter is 200 or more returns one
    value per row too many."""
    return torch.cat([theta, theta[:, :1]], 1) if SHAPE_BUG["on"] and theta[0, 0] >= 200 else theta


def test_a_chunk_of_another_shape_after_a_resume_is_a_counted_failure_and_a_broken_simulator_still_stops(tmp_path):
    theta = torch.arange(600.0).reshape(300, 2) / 2  # chunks of 100 rows start at theta 0, 100 and 200
    store = tmp_path / "a.zarr"
    simulate(shape_of_rows_from_200, theta[:100], batch_size=100, store=store)  # as if killed after one chunk
    with pytest.warns(UserWarning, match=r"BadOutput 100.*but earlier chunks had \(2,\)"):
        result = simulate(shape_of_rows_from_200, theta, batch_size=100, store=store)  # a success, then the chunk
    assert result.reused == 100 and result.num_invalid == 100 and torch.equal(result.x[:200], theta[:200])
    with pytest.warns(UserWarning, match="BadOutput 100"):  # the next rerun resumes with the same counts
        assert simulate(shape_of_rows_from_200, theta, batch_size=100, store=store).reused == 300
    # resumed where only bad rows are left, nothing succeeds in this call: stopped early, as a broken simulator
    store = tmp_path / "b.zarr"
    simulate(shape_of_rows_from_200, theta[:200], batch_size=100, store=store)
    with pytest.raises(SimulationError, match=r"cannot run.*the store's rows have \(2,\)"):
        simulate(shape_of_rows_from_200, theta, batch_size=100, store=store)
    SHAPE_BUG["on"] = False  # fixed: the stored rows are kept, only the rest is simulated
    try:
        again = simulate(shape_of_rows_from_200, theta, batch_size=100, store=store)
    finally:
        SHAPE_BUG["on"] = True
    assert again.reused == 200 and again.num_invalid == 0


BROKEN = {"on": True}


def broken_after_100(theta):
    """x = theta, but (while ``BROKEN["on"]``) raises for any chunk whose first parameter is 100 or more."""
    if BROKEN["on"] and theta[0, 0] >= 100:
        raise RuntimeError("a bug in the new code path")
    return theta


def test_the_small_chunks_of_a_call_stopped_as_cannot_run_are_not_stored_as_failures(tmp_path):
    """Chunks of 5 rows: four chunks fail before the call stops as "cannot run". They are not stored as
    failed rows, so the rerun with the simulator fixed simulates them (before, they stayed failed)."""
    theta = torch.arange(400.0).reshape(200, 2)  # rows from 50 on have theta[:, 0] >= 100
    store = tmp_path / "sims.zarr"
    simulate(broken_after_100, theta[:50], batch_size=5, store=store)  # 50 good rows, x's layout stored
    with pytest.raises(SimulationError, match=r"cannot run: the first 20 simulations all failed"):
        simulate(broken_after_100, theta, batch_size=5, store=store)
    with pytest.warns(UserWarning, match="incomplete: 50 of 200 rows finished"):
        stored = load_simulations(store)
    assert len(stored.theta) == 50 and stored.num_invalid == 0  # the failed chunks were not written
    BROKEN["on"] = False
    try:
        fixed = simulate(broken_after_100, theta, batch_size=5, store=store)
    finally:
        BROKEN["on"] = True
    assert fixed.reused == 50 and fixed.num_invalid == 0 and torch.equal(fixed.x, theta)
    # failures before a call's first success are stored once it succeeds, and at the end of a call
    store = tmp_path / "mixed.zarr"
    flaky = torch.cat([theta[60:70], theta[:40]])  # two failing chunks, then successes
    with pytest.warns(UserWarning, match="10 invalid"):
        result = simulate(broken_after_100, flaky, batch_size=5, store=store)
    assert result.num_invalid == 10
    with pytest.warns(UserWarning, match="10 invalid"):
        again = simulate(broken_after_100, flaky, batch_size=5, store=store)
    assert again.reused == 50 and again.num_invalid == 10  # stored as failed rows: nothing simulated again


CALLS = {"n": 0, "interrupt_after": None}


def interrupted_later(theta):
    """broken_after_100, raising KeyboardInterrupt once ``CALLS["interrupt_after"]`` calls were made."""
    CALLS["n"] += 1
    if CALLS["interrupt_after"] is not None and CALLS["n"] > CALLS["interrupt_after"]:
        raise KeyboardInterrupt
    return broken_after_100(theta)


def test_an_interrupt_before_the_first_success_keeps_the_failed_chunks_in_the_store(tmp_path):
    theta = torch.arange(400.0).reshape(200, 2)
    store = tmp_path / "sims.zarr"
    simulate(interrupted_later, theta[:10], batch_size=5, store=store)  # x's layout is known from here on
    CALLS.update(n=0, interrupt_after=3 * 6)  # three failing chunks: one call and five row retries each
    try:
        with pytest.raises(SimulationInterrupted):
            simulate(interrupted_later, torch.cat([theta[:10], theta[60:100]]), batch_size=5, store=store)
    finally:
        CALLS.update(interrupt_after=None)
    with pytest.warns(UserWarning, match="incomplete: 25 of 50 rows finished"):
        stored = load_simulations(store)
    assert stored.num_invalid == 15  # the failed rows paid for are kept, as finished rows are


def mixed_errors(theta):
    raise (ValueError if int(theta[0, 0]) % 4 == 0 else RuntimeError)("bad")


def test_every_row_failing_with_two_exception_types_is_a_simulation_error():
    """Fewer than 20 failures of each type do not stop the call early; it still ends in a named error
    (before: an IndexError, since failures held back for want of an x shape were never counted)."""
    theta = torch.arange(60.0).reshape(30, 2)  # chunks of 5 start at 0, 10, 20, ...: both types
    with pytest.raises(SimulationError, match=r"all 30 simulations failed \(first: ValueError: bad\)") as info:
        simulate(mixed_errors, theta, batch_size=5)
    assert len(info.value.partial.failures) == 30


def test_stored_failures_simulated_again_do_not_count_as_a_simulator_that_cannot_run(tmp_path):
    """retry_failed (or a longer timeout) sends rows that failed before first: failing again, they are no
    evidence of a broken simulator. Before, 20 of them stopped the call before its new rows, on every rerun."""
    rows = torch.arange(160.0).reshape(80, 2)  # rows 50..79 fail
    theta = torch.cat([rows, rows[:20] + 0.5])  # 20 new rows that succeed
    store = tmp_path / "sims.zarr"
    with pytest.warns(UserWarning, match="30 invalid"):
        simulate(broken_after_100, theta[:80], batch_size=5, store=store)
    with pytest.warns(UserWarning, match="30 invalid"):
        again = simulate(broken_after_100, theta, batch_size=5, store=store, retry_failed=True)
    assert again.reused == 50 and len(again.failures) == 30 and torch.equal(again.x[80:], theta[80:])


def test_a_kill_while_a_new_store_creates_its_x_array_leaves_a_store_the_next_run_completes(tmp_path):
    import zarr

    store = tmp_path / "sims.zarr"
    first = simulate_from_prior(seeded, PRIOR, 20, seed=1, batch_size=10, store=store)
    group = zarr.open_group(zarr.storage.LocalStore(store), mode="a")
    meta = dict(group.attrs["sbiflows_simulations"])
    del meta["x"]  # the x array is made first, then its layout recorded: killed in between,
    group.attrs["sbiflows_simulations"] = meta  # before any chunk was recorded
    for record in (store / "records").glob("*.json"):
        record.unlink()
    again = simulate_from_prior(seeded, PRIOR, 20, seed=1, batch_size=10, store=store)
    assert again.reused == 0 and bitwise_equal(again.x, first.x)
    assert simulate_from_prior(seeded, PRIOR, 20, seed=1, batch_size=10, store=store).reused == 20


def test_a_corrupted_chunk_is_detected_and_simulated_again(tmp_path):
    store = tmp_path / "sims.zarr"
    first = simulate_from_prior(seeded, PRIOR, 60, seed=1, batch_size=10, store=store)
    record = json.loads((store / "records" / "2.json").read_text())
    record["x_sha256"] = "0" * 64  # as if the chunk's bytes had changed on disk
    (store / "records" / "2.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="chunk 2 .* is corrupted"):
        again = simulate_from_prior(seeded, PRIOR, 60, seed=1, batch_size=10, store=store)
    assert again.reused == 50 and bitwise_equal(again.x, first.x)
    chunk_file = sorted(p for p in (store / "x" / "c").rglob("*") if p.is_file())[3]  # flip a byte of the data
    data = bytearray(chunk_file.read_bytes())
    data[-1] ^= 0xFF
    chunk_file.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupted"):
        again = simulate_from_prior(seeded, PRIOR, 60, seed=1, batch_size=10, store=store)
    assert bitwise_equal(again.x, first.x)


def test_failed_rows_stay_failed_on_resume_unless_retried(tmp_path):
    store = tmp_path / "sims.zarr"
    flaky_state = {"fail": True}

    def flaky(theta, seed):
        if flaky_state["fail"] and (theta[:, 0] > 1.0).any():
            raise RuntimeError("license server busy")
        return seeded(theta, seed)

    flaky.__qualname__ = "flaky"
    with pytest.warns(UserWarning, match="RuntimeError"):
        first = simulate_from_prior(flaky, PRIOR, 200, seed=0, batch_size=20, store=store)
    flaky_state["fail"] = False
    with pytest.warns(UserWarning, match="license server busy"):
        kept = simulate_from_prior(flaky, PRIOR, 200, seed=0, batch_size=20, store=store)
    assert [f.index for f in kept.failures] == [f.index for f in first.failures] != []
    retried = simulate_from_prior(flaky, PRIOR, 200, seed=0, batch_size=20, store=store, retry_failed=True)
    assert not retried.failures and torch.isfinite(retried.x).all()
    assert bitwise_equal(retried.x[first.valid], first.x[first.valid])
    assert not load_simulations(store).failures


def test_ctrl_c_keeps_finished_chunks_in_the_store_and_in_the_exception(tmp_path):
    store = tmp_path / "sims.zarr"

    def interrupted(theta, seed):
        if theta[0, 0] >= 50:
            raise KeyboardInterrupt
        return theta

    interrupted.__qualname__ = "interrupted"
    theta = torch.arange(100.0)[:, None]
    with pytest.raises(SimulationInterrupted, match="50 simulations finished.*rerun to resume") as info:
        simulate(interrupted, theta, batch_size=10, store=store)
    assert torch.equal(info.value.partial.x, theta[:50])
    with pytest.warns(UserWarning, match="incomplete: 50 of 100 rows"):
        partial = load_simulations(store)
    assert not partial.complete and torch.equal(partial.x, theta[:50])


def test_a_store_in_use_by_another_run_is_refused(tmp_path):
    from sbiflows.engine.store import SimulationStore

    store = tmp_path / "sims.zarr"
    simulate(seeded, torch.zeros(10, 2), store=store)
    config = {"seed": 0, "batch_size": 1000, "simulator": f"{__name__}.seeded", "vectorized": True,
              "theta_dim": 2, "theta_dtype": "torch.float32"}
    held = SimulationStore.open(store, config, rows=10, theta_dim=2, theta_dtype=np.float32)
    try:
        with pytest.raises(RuntimeError, match="in use by another process"):
            simulate(seeded, torch.zeros(10, 2), store=store)
    finally:
        held.close()


def test_load_simulations_names_a_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no simulation store"):
        load_simulations(tmp_path / "nothing.zarr")


SCRIPT = textwrap.dedent("""
    import os, sys, time
    import torch
    from torch.distributions import Independent, Normal
    from sbiflows import simulate_from_prior

    LOG = sys.argv[2]  # read here: a worker process has other arguments

    def slow(theta, seed):
        time.sleep(0.02)
        x = theta + torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed))
        with open(LOG, "a") as log:  # one line per chunk simulated (append is atomic)
            log.write(f"{float(theta[0, 0])!r} {os.getpid()}\\n")
        return x

    prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    simulate_from_prior(slow, prior, 1000, seed=3, batch_size=5, workers=2, store=sys.argv[1])
""")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bitwise_an_uninterrupted_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    store, log = tmp_path / "killed.zarr", tmp_path / "killed.log"
    process = subprocess.Popen([sys.executable, str(script), str(store), str(log)])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((store / "records").glob("*.json"))) < 40:
        time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_at_kill = len(list((store / "records").glob("*.json")))
    assert 40 <= done_at_kill < 200
    workers = {int(line.split()[1]) for line in log.read_text().splitlines()}
    assert len(workers) == 2
    assert not wait_for_exit(workers)  # no orphan keeps simulating (the watchdogs see their parent gone)
    subprocess.run([sys.executable, str(script), str(store), str(log)], check=True)
    fresh_store, fresh_log = tmp_path / "fresh.zarr", tmp_path / "fresh.log"
    subprocess.run([sys.executable, str(script), str(fresh_store), str(fresh_log)], check=True)
    resumed, fresh = load_simulations(store), load_simulations(fresh_store)
    assert resumed.complete and bitwise_equal(resumed.x, fresh.x) and torch.equal(resumed.theta, fresh.theta)
    lines = [line.split()[0] for line in log.read_text().splitlines()]
    twice = len(lines) - len(set(lines))
    assert len(set(lines)) == 200 and twice <= 2  # at most `workers` chunks simulated twice


def kills_its_dask_worker_once(theta, seed):
    marker = Path(os.environ["SBIFLOWS_TEST_MARKER"])
    if theta[0, 0] == 60 and not marker.exists():
        marker.write_text("")
        os.kill(os.getppid(), signal.SIGKILL)  # the sandbox's parent is the Dask worker process
        time.sleep(10)
    return theta + torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_dask_local_cluster_same_numbers_and_survives_a_killed_worker(tmp_path, monkeypatch):
    import distributed  # in the dev extra: CI runs this on a real LocalCluster
    monkeypatch.setenv("SBIFLOWS_TEST_MARKER", str(tmp_path / "killed-once"))
    theta = torch.arange(200.0)[:, None].repeat(1, 2)
    (tmp_path / "killed-once").write_text("")  # in-process, the simulator must not kill anything
    reference = simulate(kills_its_dask_worker_once, theta, batch_size=10)
    (tmp_path / "killed-once").unlink()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=40) as cluster, distributed.Client(cluster) as client:
        result = simulate(kills_its_dask_worker_once, theta, batch_size=10, executor=client,
                          store=tmp_path / "dask.zarr")
        assert (tmp_path / "killed-once").exists()  # a worker really was killed
        assert bitwise_equal(result.x, reference.x) and not result.failures
        for _ in range(2):  # runs one after another on one client (the simulator is sent anew each time)
            again = simulate(kills_its_dask_worker_once, theta, batch_size=10, executor=client)
            assert bitwise_equal(again.x, reference.x)


def hangs_twice_then_fails(theta, seed):
    """The first two chunks to start (slot files made atomically) write their process id and simulate for an
    hour; any later one fails at once."""
    for slot in ("slot0", "slot1"):
        try:
            descriptor = os.open(Path(os.environ["SBIFLOWS_TEST_PID_DIR"], slot), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(descriptor, str(os.getpid()).encode())
        os.close(descriptor)
        time.sleep(3600)
        return theta
    raise ValueError("bad row")


@pytest.mark.slow
def test_a_stopped_dask_run_stops_its_simulations_on_the_cluster(tmp_path, monkeypatch):
    """A run that stopped (here ``on_error="raise"``) left its chunks on the cluster: queued ones started after it
    and running ones simulated to the end, since cancelling a Dask task does not stop its sandbox's child."""
    import distributed

    from sbiflows.engine.backends import STOP_POLL

    monkeypatch.setenv("SBIFLOWS_TEST_PID_DIR", str(tmp_path))
    theta = torch.ones(9, 2)  # the third chunk to start fails while two others run
    with distributed.LocalCluster(n_workers=1, threads_per_worker=3, processes=True, dashboard_address=":0",
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        with pytest.raises(SimulationError, match="bad row"):
            simulate(hangs_twice_then_fails, theta, batch_size=1, executor=client, timeout=7200, on_error="raise")
        time.sleep(STOP_POLL + 5)  # chunks that were loading their simulator have started it by now, or never will
        pids = {int(path.read_text()) for path in tmp_path.iterdir()}
        assert len(pids) == 2 and not wait_for_exit(pids, 3 * STOP_POLL)  # both simulations were killed


def _kill_this_worker():
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_dask_recovers_the_simulator_when_every_worker_holding_it_dies():
    """The pickled simulator is a task's result on the cluster: Dask recomputes it when its holders die
    (scattered data would be lost for good, and the Active Memory Manager trims a broadcast to one copy)."""
    import distributed

    from sbiflows.engine.backends import DaskBackend, serialize
    from sbiflows.engine.jobs import Job

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        backend = DaskBackend(client, serialize(seeded, client), timeout=60, vectorized=True, seeded=True)
        job = Job(chunk=0, start=0, theta=torch.zeros(3, 2), seeds=(7,))
        expected = seeded(torch.zeros(3, 2), 7).numpy()
        assert np.array_equal(backend.outcome(backend.submit(job)).x, expected)
        holders = client.who_has([backend._payload])[backend._payload.key]
        assert holders
        try:
            client.run(_kill_this_worker, workers=list(holders))
        except Exception:  # noqa: BLE001, S110 - the workers die before they answer
            pass
        client.wait_for_workers(2, timeout=60)  # the nannies restart them
        assert np.array_equal(backend.outcome(backend.submit(job)).x, expected)
        backend.close()


def test_a_shorter_rerun_with_retry_keeps_the_rows_past_it(tmp_path):
    """``retry_failed`` rebuilt a stored chunk from this run's shorter span and rewrote it with fewer rows: the
    store forgot paid-for rows (a later full run simulated them again)."""
    calls, broken = [], [True]

    def simulator(theta):
        calls.append(len(theta))
        if broken[0] and bool((theta[:, 0] == 5).any()):
            raise ValueError("bad row")
        return 2 * theta

    theta = torch.arange(10.0).unsqueeze(1).repeat(1, 2)
    store = tmp_path / "s.zarr"
    with pytest.warns(UserWarning, match="1 of 10 simulations failed|failed"):
        simulate(simulator, theta, batch_size=4, store=store)
    broken[0] = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        simulate(simulator, theta[:6], batch_size=4, store=store, retry_failed=True)
    assert any("1 failed rows of chunk 1" in str(w.message) and "the chunk holds 4 rows and this run only its first "
               "2; rerun with all 8 or more rows" in str(w.message) for w in caught), [str(w.message) for w in caught]
    calls.clear()
    again = simulate(simulator, theta, batch_size=4, store=store, retry_failed=True)  # the full run retries the row
    assert calls == [1] and again.reused == 9 and not again.failures
    assert torch.equal(again.x, 2 * theta)


def test_a_store_where_nothing_finished_takes_the_next_runs_settings(tmp_path):
    """A run stopped as "cannot run" kept its settings in the store, so following its advice (vectorized=False)
    was refused as a store of another run."""

    def per_row(theta):  # written for one parameter set
        assert theta.ndim == 1, "expects one parameter set"
        return 2 * theta

    theta = torch.rand(40, 2)
    store = tmp_path / "s.zarr"
    with pytest.raises(SimulationError, match="needs vectorized=False"):
        simulate(per_row, theta, batch_size=4, store=store)
    result = simulate(per_row, theta, batch_size=4, store=store, vectorized=False)
    assert torch.equal(result.x, 2 * theta)
    with pytest.raises(StoreMismatchError, match="vectorized"):  # once rows finished, the settings are the store's
        simulate(per_row, theta, batch_size=4, store=store)


def _scaled(theta, *, scale):
    return scale * theta


def test_partials_of_other_functions_or_arguments_are_other_simulators(tmp_path):
    """Every ``functools.partial`` was recorded as "functools.partial": a store took any other partial's rows."""
    import functools

    store = tmp_path / "s.zarr"
    simulate(functools.partial(_scaled, scale=1.0), torch.ones(4, 2), store=store)
    with pytest.raises(StoreMismatchError, match=r"functools.partial\(.*_scaled, arguments"):
        simulate(functools.partial(_scaled, scale=2.0), torch.ones(4, 2), store=store)
    again = simulate(functools.partial(_scaled, scale=1.0), torch.ones(4, 2), store=store)
    assert again.reused == 4
    meta = json.loads((store / "zarr.json").read_text())  # a store written before: the bare name
    meta["attributes"]["sbiflows_simulations"]["config"]["simulator"] = "functools.partial"
    (store / "zarr.json").write_text(json.dumps(meta))
    assert simulate(functools.partial(_scaled, scale=1.0), torch.ones(4, 2), store=store).reused == 4


def _noisy(noise):
    def simulator(theta):
        return theta + noise

    return simulator


def test_lambdas_and_factory_closures_of_other_constants_are_other_simulators(tmp_path):
    """Every lambda of a module was recorded as ``module.<lambda>`` and every function a factory made under the
    factory's qualname: a store took the rows of a lambda with another constant, or of another noise level."""
    theta = torch.ones(4, 2)
    store = tmp_path / "lambda.zarr"
    simulate(lambda t: 2 * t, theta, store=store)
    with pytest.raises(StoreMismatchError, match=r"<lambda> \(code"):
        simulate(lambda t: 3 * t, theta, store=store)
    assert simulate(lambda t: 2 * t, theta, store=store).reused == 4  # the same lambda, defined again
    store = tmp_path / "closure.zarr"
    simulate(_noisy(0.1), theta, store=store)
    with pytest.raises(StoreMismatchError, match=r"_noisy.<locals>.simulator \(code"):
        simulate(_noisy(0.2), theta, store=store)
    assert simulate(_noisy(0.1), theta, store=store).reused == 4


def test_a_lambda_store_of_an_earlier_version_resumes(tmp_path):
    """Stores that recorded a lambda's bare qualname still resume (simulations and TSNPE rounds)."""
    from sbiflows.engine.names import simulator_name
    from sbiflows.sequential_store import RoundStore

    theta, store = torch.ones(4, 2), tmp_path / "s.zarr"
    simulate(lambda t: 2 * t, theta, store=store)
    meta = json.loads((store / "zarr.json").read_text())
    config = meta["attributes"]["sbiflows_simulations"]["config"]
    config["simulator"] = config["simulator"].split(" (code")[0]
    (store / "zarr.json").write_text(json.dumps(meta))
    assert simulate(lambda t: 2 * t, theta, store=store).reused == 4
    name = simulator_name(lambda t: 2 * t)
    RoundStore(tmp_path / "rounds", {"simulator": name.split(" (code")[0], "seed": 0})
    RoundStore(tmp_path / "rounds", {"simulator": name, "seed": 0})  # no mismatch
    with pytest.raises(ValueError, match="other settings"):
        RoundStore(tmp_path / "rounds", {"simulator": "module.other", "seed": 0})


def test_a_closure_over_state_it_mutates_keeps_its_store_name():
    """A closure's lists and objects enter its name by type only: a simulator that counts its calls or flips a
    flag must resume its own store."""
    from sbiflows.engine.names import simulator_name

    calls, flag = [], [True]

    def simulator(theta):
        calls.append(len(theta))
        return theta if flag[0] else -theta

    before = simulator_name(simulator)
    calls.extend([1, 2, 3])
    flag[0] = False
    assert simulator_name(simulator) == before
    count = 0

    def counting(theta):  # an interrupted run of this simulator, resumed in the same session, must find its store
        nonlocal count
        count += 1
        return theta

    before = simulator_name(counting)
    counting(torch.ones(1, 2))
    assert simulator_name(counting) == before


class _Scaled:
    """A simulator object whose setting is an attribute; ``calls`` is state its method updates."""

    def __init__(self, scale: float):
        self.scale, self.calls = scale, 0

    def simulate(self, theta):
        self.calls += 1
        return self.scale * theta

    __call__ = simulate


class _Shifted(_Scaled):
    pass


def test_objects_of_other_settings_or_classes_are_other_simulators(tmp_path):
    """A bound method and a callable object were named by their class: a store took the rows of an instance of
    another setting, and every subclass that inherits the method shared one name (the ten benchmark tasks'
    ``Task.simulate``)."""
    import simulators
    from sbiflows.engine.names import simulator_name

    theta = torch.ones(4, 2)
    for name, make in (("method", lambda scale: _Scaled(scale).simulate), ("object", _Scaled)):
        store = tmp_path / f"{name}.zarr"
        simulator = make(1.0)
        simulate(simulator, theta, store=store)
        with pytest.raises(StoreMismatchError, match=r"_Scaled.* \(state"):
            simulate(make(2.0), theta, store=store)
        assert simulate(simulator, theta, store=store).reused == 4  # its call counter moved: the same simulator
        assert simulate(make(1.0), theta, store=store).reused == 4
        meta = json.loads((store / "zarr.json").read_text())  # a store written before: the bare name
        config = meta["attributes"]["sbiflows_simulations"]["config"]
        config["simulator"] = config["simulator"].split(" (state")[0]
        (store / "zarr.json").write_text(json.dumps(meta))
        assert simulate(make(1.0), theta, store=store).reused == 4
    assert simulator_name(_Scaled(1.0).simulate) != simulator_name(_Shifted(1.0).simulate)
    names = {simulator_name(simulators.get(task).simulate) for task in simulators.names()}
    assert len(names) == len(simulators.names())


class _Lazy:
    """A simulator whose attributes appear during its life: a cached property and an object set from outside."""

    def __init__(self, scale: float):
        self.scale = scale

    @functools.cached_property
    def offset(self) -> float:
        return 0.5

    def simulate(self, theta):
        return self.scale * theta + self.offset


def test_an_objects_store_name_does_not_change_as_it_caches_values():
    """The digest took every attribute of the object's __dict__, so a value cached on first use (a task's
    cached_property prior, read when it first simulates) renamed the simulator and its stores stopped resuming."""
    import simulators
    from sbiflows.engine.names import simulator_name

    lazy = _Lazy(2.0)
    before = simulator_name(lazy.simulate)
    lazy.simulate(torch.ones(1, 2))  # fills the cached property
    lazy.helper = object()  # and an attribute set from outside
    assert simulator_name(lazy.simulate) == before != simulator_name(_Lazy(3.0).simulate)
    task = simulators.get("two_moons")
    before = simulator_name(task.simulate)
    task.prior.sample((1,))
    assert simulator_name(task.simulate) == before


def test_store_names_are_the_same_in_every_process():
    """A name that changed with the process's string hashing would refuse every resume in a new process."""
    program = ("import simulators\n"
               "from sbiflows.engine.names import simulator_name\n"
               "def make(options):\n"
               "    return lambda t: t if 'a' in options else -t\n"
               "print(simulator_name(make(frozenset({'a', 'b', 'c', 'd'}))))\n"
               "print(simulator_name(simulators.get('two_moons').simulate))\n")
    root = Path(__file__).resolve().parents[1]
    names = {subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True, cwd=root,
                            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}).stdout
             for seed in ("0", "1", "2")}
    assert len(names) == 1 and "(code " in next(iter(names)) and "(state " in next(iter(names))


class _Grid:
    """A simulator object whose setting is an array (a grid of times)."""

    def __init__(self, times):
        self.times = times

    def __call__(self, theta):
        times = torch.as_tensor(np.asarray(self.times), dtype=theta.dtype)
        return theta[:, :1] * times


def test_simulators_whose_arrays_differ_are_other_simulators(tmp_path):
    """Attributes, closure values and partial arguments that are arrays or tensors entered a store's name by their
    type only (a partial's by NumPy's shortened repr), so a simulator on another time grid reused the first one's
    rows."""
    from sbiflows.engine.names import same_simulator, simulator_name

    def closure(times):
        return lambda theta: theta[:, :1] * times

    grid, other = np.linspace(0, 1, 2000), np.linspace(0, 2, 2000)
    makers = {"numpy attribute": _Grid, "tensor attribute": lambda a: _Grid(torch.as_tensor(a)),
              "closure": lambda a: closure(torch.as_tensor(a)),
              "partial": lambda a: functools.partial(_Grid.__call__, _Grid(None), times=a)}
    for kind, make in makers.items():
        name = simulator_name(make(grid))
        assert name.endswith(")") and ", arrays " in name, kind
        assert simulator_name(make(other)) != name and simulator_name(make(grid.copy())) == name, kind
        assert same_simulator(name.split(", arrays ")[0] + ")", name), kind  # recorded before arrays entered
        assert not same_simulator(simulator_name(make(other)), name), kind
    theta = torch.ones(4, 2)
    simulate(_Grid(grid[:3]), theta, store=tmp_path / "s.zarr")
    with pytest.raises(StoreMismatchError, match=r"_Grid.*arrays"):
        simulate(_Grid(other[:3]), theta, store=tmp_path / "s.zarr")
    assert simulate(_Grid(grid[:3].copy()), theta, store=tmp_path / "s.zarr").reused == 4


def test_a_resume_casts_chunks_to_the_stores_dtype_as_an_uninterrupted_run_does(tmp_path):
    """A per-row simulator whose fallback row is float64 makes that chunk float64; an uninterrupted run casts later
    float32 chunks to it, but a resume whose first chunk was float32 raised, telling the user to delete the store.
    (A resume is refused only where the store's dtype would round the new values: test_a_store_of_another_run.)"""
    stop = {"at": 4.0}

    def fallback(theta, seed):
        if float(theta[0]) == stop["at"]:
            raise KeyboardInterrupt
        if float(theta[0]) == 1.0:
            return np.full(2, np.nan)  # float64
        return torch.stack([theta[0], 2 * theta[0]])

    fallback.__qualname__ = "fallback"
    theta = torch.arange(8.0)[:, None]
    with pytest.raises(SimulationInterrupted), pytest.warns(UserWarning):
        simulate(fallback, theta, batch_size=4, vectorized=False, store=tmp_path / "s.zarr")
    stop["at"] = None
    resumed = simulate(fallback, theta, batch_size=4, vectorized=False, store=tmp_path / "s.zarr")
    whole = simulate(fallback, theta, batch_size=4, vectorized=False)
    assert resumed.x.dtype == whole.x.dtype == torch.float64 and resumed.reused == 4
    assert resumed.valid.tolist() == whole.valid.tolist() == [i != 1 for i in range(8)]
    assert bitwise_equal(resumed.x, whole.x)


REWRITE_SCRIPT = textwrap.dedent("""
    import os, signal, sys, warnings
    import torch
    from sbiflows import simulate
    from sbiflows.engine.store import SimulationStore

    step, kill = sys.argv[2], sys.argv[3]

    def sim(theta, seed):
        if step == "first" and (theta[:, 0] == 3).any():
            raise ValueError("flaky")
        return theta * 2

    real, calls = SimulationStore._write_record, []

    def write_record(target, record):
        calls.append(record)
        if kill == "before-final" and len(calls) == 2:  # the new data are written, the final record is not
            os.kill(os.getpid(), signal.SIGKILL)
        real(target, record)
        if kill == "before-data" and len(calls) == 1:  # the record holding the previous one is written, no data
            os.kill(os.getpid(), signal.SIGKILL)

    SimulationStore._write_record = staticmethod(write_record)
    warnings.simplefilter("ignore")
    if step == "check":  # a corrupted chunk's warning raises
        warnings.filterwarnings("error", message=".*corrupted")
    result = simulate(sim, torch.arange(8.0)[:, None], batch_size=4, store=sys.argv[1], retry_failed=step == "retry")
    print(result.reused, [f.index for f in result.failures])
""")


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["before-data", "before-final", "before-data twice"])
def test_a_kill_while_failed_rows_are_rewritten_keeps_the_chunks_good_rows(tmp_path, kill):
    """A rewritten chunk's data were written before its record: a kill between the two left the old record over new
    data, and the next run called the chunk corrupted and simulated all of it again, good rows included."""
    script, store = tmp_path / "run.py", tmp_path / "s.zarr"
    script.write_text(REWRITE_SCRIPT)

    def run(step: str, kill: str = "none") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(store), step, kill], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONWARNINGS": "ignore"})

    assert run("first").stdout.split("\n")[0] == "0 [3]"
    for _ in range(2 if kill.endswith("twice") else 1):  # the second rewrite must keep the version that verifies
        killed = run("retry", kill.split()[0])
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    again = run("check")
    assert again.returncode == 0, again.stderr  # no chunk is corrupted: every row is reused
    assert again.stdout.split("\n")[0] == ("8 []" if kill == "before-final" else "8 [3]")


def test_a_refused_run_leaves_the_store_as_it_was(tmp_path):
    """The store grew to the refused run's size before its parameters were compared, and then called itself
    incomplete."""
    store = tmp_path / "s.zarr"
    simulate(seeded, torch.zeros(100, 2), batch_size=50, store=store)
    with pytest.raises(StoreMismatchError, match="other parameters"):
        simulate(seeded, torch.ones(500, 2), batch_size=50, store=store)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = load_simulations(store)
    assert kept.complete and len(kept.x) == 100
    assert simulate(seeded, torch.zeros(150, 2), batch_size=50, store=store).reused == 100  # a larger run grows it


def test_on_error_raise_raises_for_a_failure_kept_in_the_store(tmp_path):
    """A stored failed row was returned as NaN where the same call without a store raised."""
    store = tmp_path / "s.zarr"
    with pytest.warns(UserWarning, match="ValueError"):
        simulate(failing_rows, torch.arange(8.0)[:, None], batch_size=4, store=store)
    with pytest.raises(SimulationError, match=r"theta index 3 failed with ValueError.*retry_failed=True") as info:
        simulate(failing_rows, torch.arange(8.0)[:, None], batch_size=4, store=store, on_error="raise")
    assert info.value.index == 3
    assert load_simulations(store).complete  # still whole


def failing_rows(theta):
    if (theta[:, 0] == 3).any():
        raise ValueError("bad row")
    return theta * 2


def test_a_per_row_simulators_short_last_chunk_is_extended_not_simulated_again(tmp_path):
    """A larger run simulated the stored short last chunk again as a full chunk (up to batch_size - 1 paid rows).
    A per-row simulator's rows have their own seeds, so only the missing rows need simulating; the rows equal a
    direct run's either way."""
    calls = []

    def per_row(theta, seed):
        calls.append(float(theta[0]))
        if float(theta[0]) > 1.8:
            raise ValueError("diverged")
        return theta + torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed))

    per_row.__qualname__ = "per_row"
    store = tmp_path / "s.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        simulate_from_prior(per_row, PRIOR, 95, seed=1, batch_size=10, store=store, vectorized=False)
        calls.clear()
        extended = simulate_from_prior(per_row, PRIOR, 100, seed=1, batch_size=10, store=store, vectorized=False)
        assert len(calls) == 5 and extended.reused == 95
        direct = simulate_from_prior(per_row, PRIOR, 100, seed=1, batch_size=10, vectorized=False)
    assert bitwise_equal(extended.x, direct.x) and torch.equal(extended.theta, direct.theta)
    assert [f.index for f in extended.failures] == [f.index for f in direct.failures]
    again = load_simulations(store)
    assert again.complete and bitwise_equal(again.x, direct.x)


class _Buffered:
    """A simulator with an object array, a buffer it fills in place, and tensors torch cannot copy out."""

    def __init__(self):
        self.labels = np.array(["a", "b"], dtype=object)
        self.out = np.zeros(4)
        self.meta = torch.empty(3, device="meta")
        self.sparse = torch.eye(3).to_sparse()
        self.nested = [1.0]
        self.nested.append(self.nested)  # a list that holds itself

    def __call__(self, theta):
        self.out[:] = float(theta.sum())
        return theta * 2


def test_array_settings_that_are_no_settings_keep_a_simulators_name():
    """Object arrays entered names by their pointers (another name in every process), a buffer filled in place
    renamed the simulator between two calls, meta and sparse tensors raised, a list holding itself never ended,
    and an earlier version's name of a partial over a closure no longer matched."""
    from sbiflows.engine.names import same_simulator, simulator_name

    simulator = _Buffered()
    name = simulator_name(simulator)
    simulator(torch.ones(2, 2))
    assert simulator_name(simulator) == name and ", arrays " in name  # the buffer: digested as first seen
    simulator.out = np.ones(4)  # another array set: another digest
    assert simulator_name(simulator) != name

    def outer(grid):
        return lambda theta, scale: theta * grid * scale

    current = simulator_name(functools.partial(outer(np.arange(3.0)), scale=2.0))
    cut = current.index(", arrays ")  # inside: "functools.partial(...<lambda> (code C, arrays A), arguments B)"
    legacy = current[:cut] + current[cut + len(", arrays ") + 12:]
    assert current.count(", arrays ") == 1 and not legacy.endswith(", arrays") and same_simulator(legacy, current)

"""The thread rule of sbiflows.threads: one torch thread inside sbiflows' calls unless the user chose."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal

from sbiflows import NPE, threads
from sbiflows.diagnostics import c2st


SEEN: list[int] = []  # shared by the copies NPE and Posterior make of the embedding


class ThreadSpy(nn.Module):
    """An identity embedding that records torch's thread count whenever the flow runs."""

    def forward(self, x):
        SEEN.append(torch.get_num_threads())
        return x


@pytest.fixture
def three_threads(monkeypatch):
    """A machine whose torch default is 3 threads and whose user chose nothing."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    monkeypatch.setattr(threads, "_AT_IMPORT", 3)
    yield
    torch.set_num_threads(before)


def fitted(**options):
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(300, 2, generator=generator)
    x = theta + 0.3 * torch.randn(300, 2, generator=generator)
    SEEN.clear()
    npe = NPE(Independent(Normal(torch.zeros(2), torch.ones(2)), 1), transforms=1, hidden_features=(8, 8),
              embedding_net=ThreadSpy())
    posterior = npe.fit(theta, x, max_epochs=2, progress=False, **options)
    seen = set(SEEN)
    SEEN.clear()
    return posterior, seen


def test_every_flow_call_runs_on_one_thread_and_restores_the_count(three_threads):
    posterior, seen = fitted()
    assert seen == {1}
    x = torch.zeros(2)
    calls = {
        "sample": lambda: posterior.sample(10, x, seed=0),
        "sample_batched": lambda: posterior.sample_batched(10, torch.zeros(3, 2)),
        "log_prob": lambda: posterior.log_prob(torch.zeros(4, 2), x),
        "log_prob_batched": lambda: posterior.log_prob_batched(torch.zeros(4, 3, 2), torch.zeros(3, 2)),
        "map": lambda: posterior.map(x, num_init_samples=20, num_to_optimize=2, num_iter=2),
    }
    for name, call in calls.items():
        SEEN.clear()
        call()
        assert set(SEEN) == {1}, name
        assert torch.get_num_threads() == 3, name
    a = torch.randn(100, 2, generator=torch.Generator().manual_seed(1))
    c2st(a, a + 1.0, max_epochs=2)  # the classifier, too
    assert torch.get_num_threads() == 3


def test_a_count_the_user_chose_is_left_alone(three_threads):
    torch.set_num_threads(2)  # the user's choice: differs from torch's count at import
    posterior, seen = fitted()
    posterior.sample(10, torch.zeros(2))
    assert seen == {2} and set(SEEN) == {2}


def test_the_environment_variables_count_as_the_users_choice(three_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    _, seen = fitted()
    assert seen == {3}


def test_an_explicit_num_threads_wins_and_is_checked(three_threads):
    _, seen = fitted(num_threads=2)
    assert seen == {2} and torch.get_num_threads() == 3
    with pytest.raises(TypeError, match="num_threads must be an int >= 1, got bool True"):
        fitted(num_threads=True)
    with pytest.raises(ValueError, match="num_threads must be an int >= 1, got 0"):
        fitted(num_threads=0)


def test_calls_from_executor_threads_each_restore_their_own_count(three_threads):
    """torch's thread count belongs to the OS thread: calls on a pool's threads do not disturb the caller."""
    posterior, _ = fitted()

    def draw(seed):
        before = torch.get_num_threads()
        posterior.sample(50, torch.zeros(2), seed=seed)
        return before, torch.get_num_threads()

    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(draw, range(16)))
    assert all(before == after for before, after in counts)
    assert torch.get_num_threads() == 3

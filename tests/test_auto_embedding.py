"""NPE's default ``embedding_net="auto"``: a shared linear summary of long x, saved, refitted and in ensembles."""

import pytest
import torch
from torch.distributions import Independent, Normal

from sbiflows import NPE, load
from sbiflows.embeddings import AUTO_VALUES_PER_PARAMETER, Linear

PRIOR = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)


def long_x(theta: torch.Tensor, distractors: int) -> torch.Tensor:
    """Two noisy copies of theta, then pure-noise values that carry nothing about it."""
    signal = torch.cat([theta, theta], 1) + 0.3 * torch.randn(len(theta), 4)
    return torch.cat([signal, torch.randn(len(theta), distractors)], 1)


def data(n: int, values: int, seed: int = 0):
    torch.manual_seed(seed)
    theta = PRIOR.sample((n,))
    return theta, long_x(theta, values - 4)


def test_long_x_gets_a_linear_summary_that_is_saved(tmp_path):
    values = AUTO_VALUES_PER_PARAMETER * 2 + 1
    theta, x = data(300, values)
    posterior = NPE(PRIOR, transforms=1, hidden_features=(16,)).fit(theta, x, max_epochs=2, progress=False)
    assert posterior.config["embedding"] == "linear"
    assert posterior.config["embedding_config"] == {"in_features": values, "out_features": 4}
    assert posterior.config["context_features"] == 4 and type(posterior.net.embedding) is Linear
    posterior.save(tmp_path / "p.pt")
    loaded = load(tmp_path / "p.pt")
    torch.testing.assert_close(loaded.log_prob(theta[:7], x=x[0]), posterior.log_prob(theta[:7], x=x[0]),
                               rtol=0, atol=0)


def test_short_x_and_embedding_net_none_go_to_the_flow_as_they_are():
    theta, x = data(200, AUTO_VALUES_PER_PARAMETER * 2)
    short = NPE(PRIOR, transforms=1, hidden_features=(16,)).fit(theta, x, max_epochs=1, progress=False)
    assert short.config["embedding"] == "none" and short.config["context_features"] == x.shape[1]
    theta, x = data(200, 40)
    plain = NPE(PRIOR, transforms=1, hidden_features=(16,), embedding_net=None).fit(theta, x, max_epochs=1,
                                                                                    progress=False)
    assert plain.config["embedding"] == "none" and plain.config["context_features"] == 40


def test_other_embedding_values_are_refused_before_training():
    with pytest.raises(ValueError, match=r"embedding_net must be an nn.Module, None or one of \('auto', 'mlp', "
                                         r".*got 'MLP'"):  # a built-in's name is lower case
        NPE(PRIOR, embedding_net="MLP")
    with pytest.raises(TypeError, match=r"embedding_net must be a torch.nn.Module, None or one of .*got int"):
        NPE(PRIOR, embedding_net=3)
    assert NPE(PRIOR, embedding_net="mlp").embedding_net == "mlp"  # built at the first fit


def test_refits_keep_the_summary_and_members_get_their_own():
    theta, x = data(300, 30)
    npe = NPE(PRIOR, transforms=1, hidden_features=(16,), ensemble=2)
    first = npe.fit(theta, x, max_epochs=1, progress=False)
    members = first.net.members
    assert all(type(m.embedding) is Linear for m in members)
    assert not torch.equal(members[0].embedding.linear.weight, members[1].embedding.linear.weight)
    more, more_x = data(100, 30, seed=1)
    second = npe.fit(more, more_x, max_epochs=1, progress=False)
    assert second.config["embedding"] == "linear" and second.config["context_features"] == 4


def test_the_summary_fits_held_out_pairs_better_when_most_of_x_is_noise():
    """40 values for 2 parameters, 36 of them noise: the shared summary beats per-layer conditioners on all of x."""
    theta, x = data(1000, 40)
    test_theta, test_x = data(500, 40, seed=7)
    scores = {}
    for name, embedding in (("auto", "auto"), ("none", None)):
        posterior = NPE(PRIOR, transforms=3, hidden_features=(32, 32), embedding_net=embedding).fit(
            theta, x, seed=0, progress=False)
        with torch.no_grad():
            scores[name] = -posterior.log_prob_batched(test_theta[None], test_x)[0].mean().item()
    assert scores["auto"] < scores["none"] - 0.05, scores

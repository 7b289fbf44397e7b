"""An ensemble of posterior networks: the equal-weight mixture ``q(u | x) = (1/K) sum_k q_k(u | x)``.

``NPE(prior, ensemble=K)`` trains ``K`` :class:`~sbiflows.estimator.PosteriorNet` members on the same
rows with different seeds (initial weights, validation split and minibatch order) and wraps them in an
:class:`EnsembleNet`, which has the interface :class:`~sbiflows.Posterior` uses, so sampling, densities,
``map``, saving and every diagnostic work unchanged. Ensembles are the field's first remedy for
over-confident NPE posteriors: a mixture is at least as wide as its members where they disagree.

``NPE(prior, ensemble="auto")`` trains one flow, checks it with :func:`auto_check` on its own
validation rows (held out from its training), and adds the members of ``ensemble=3`` only when that
flow is over-confident there; the single flow is the first member either way.

* **Training**: the members step together, one vectorized forward and backward pass per minibatch
  over their stacked weights (:mod:`sbiflows.ensemble_training`), each with its own split, minibatch
  order, step size and early stopping.
* **Density**: ``log q = logsumexp_k log q_k - log K``; with ``weights`` ``w_k``, ``logsumexp_k (log q_k +
  log w_k)`` (:func:`~sbiflows.snapshots.stacking_weights` fits them to held-out rows).
* **Sampling**: each draw picks a member uniformly at random (with ``weights``: member ``k`` with probability
  ``w_k``), then draws from it; each member only
  computes the draws assigned to it. With a seed, the member of draw ``i`` comes from a uniform
  variable drawn in the same fixed seeded blocks as the base noise (:attr:`EnsembleBase`), so seeded
  draws stay independent of chunking.
* **Context**: ``context(x)`` stacks the members' contexts along a member axis, ``(*batch, K, C)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from sbiflows.checks import check_int
from sbiflows.estimator import PosteriorNet
from sbiflows.seeding import derive_seed

__all__ = [
    "AUTO_DRAWS", "AUTO_MEMBERS", "AUTO_ROWS", "AUTO_SIGMAS", "DEFAULT_ENSEMBLE", "ENSEMBLE_CHOICES", "EnsembleBase", "EnsembleNet",
    "auto_check", "auto_summary", "check_ensemble", "check_weights", "member_seed", "members_of", "mixture",
    "stack", "weights_of",
]

#: ``ensemble="auto"``: the members trained when the first flow fails :func:`auto_check`.
AUTO_MEMBERS = 3
#: :func:`auto_check` uses at most this many validation rows, with this many posterior draws each.
AUTO_ROWS, AUTO_DRAWS = 1000, 100
#: :func:`auto_check` fails a flow whose coverage is this many binomial standard deviations below a level.
AUTO_SIGMAS = 2.5


class EnsembleBase(nn.Module):
    """Base noise of an ensemble: the members' base draws ``(..., D)`` plus one uniform column that picks
    the member of each draw."""

    def __init__(self, base: nn.Module, members: int):
        super().__init__()
        self.inner, self.members = base, members

    def sample(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None) -> Tensor:
        """Samples of shape ``(*shape, D + 1)``: base draws, then a uniform in [0, 1)."""
        z = self.inner.sample(shape, generator=generator)
        pick = torch.rand(*shape, 1, generator=generator, device=z.device, dtype=z.dtype)
        return torch.cat([z, pick], -1)


class _Flow:
    """What :class:`~sbiflows.Posterior` reads from ``net.flow``: the base of seeded draws."""

    def __init__(self, base: EnsembleBase):
        self.base = base


class EnsembleNet(nn.Module):
    """``K`` posterior networks as one equal-weight mixture (see the module docstring).

    Args:
        members: Trained (or to be trained) networks of the same architecture and data standardization.
        weights: The members' mixture weights (``K`` values >= 0 that sum to 1); None: equal weights.

    Example:
        >>> from sbiflows.flows import maf
        >>> nets = [PosteriorNet(maf(2, 2, transforms=1, hidden_features=(8,), seed=k), nn.Identity(), theta_dim=2,
        ...                      x_dim=2) for k in range(3)]
        >>> ensemble = EnsembleNet(nets)
        >>> context = ensemble.context(torch.zeros(4, 2))
        >>> context.shape, ensemble.sample_given_context(5, context).shape
        (torch.Size([4, 3, 2]), torch.Size([5, 4, 2]))
        >>> lp = ensemble.log_prob_given_context(torch.zeros(4, 2), context)
        >>> members = torch.stack([n.log_prob_given_context(torch.zeros(4, 2), context[:, k]) for k, n in enumerate(nets)])
        >>> bool(torch.allclose(lp, members.exp().mean(0).log()))
        True
        >>> weighted = EnsembleNet(nets, weights=[0.2, 0.3, 0.5])
        >>> lp = weighted.log_prob_given_context(torch.zeros(4, 2), context)
        >>> bool(torch.allclose(lp, (members.exp() * torch.tensor([0.2, 0.3, 0.5])[:, None]).sum(0).log()))
        True
    """

    def __init__(self, members: list[PosteriorNet], *, weights: Any = None):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)
        # on the members' device and in their dtype (float64 is not on every device); not in the state dict: a
        # saved posterior records them in its config (``mixture_weights``)
        where = members[0].u_shift
        self.register_buffer("weights", None if weights is None else
                             check_weights(weights, len(members)).to(device=where.device, dtype=where.dtype),
                             persistent=False)
        self.theta_dim, self.x_dim = members[0].theta_dim, members[0].x_dim
        self.x_shape, self.padded_trials = members[0].x_shape, members[0].padded_trials
        self.flow = _Flow(EnsembleBase(members[0].flow.base, len(members)))

    # the standardization and device of the members (they share the data, hence the statistics)
    @property
    def u_shift(self) -> Tensor:
        return self.members[0].u_shift

    @property
    def x_shift(self) -> Tensor:
        return self.members[0].x_shift

    @property
    def x_scale(self) -> Tensor:
        return self.members[0].x_scale

    @property
    def fewest_trials(self) -> int | None:
        return self.members[0].fewest_trials

    def context(self, x: Tensor) -> Tensor:
        """The members' contexts for ``x`` ``(*batch, x_dim)``: ``(*batch, K, C)``."""
        return torch.stack([member.context(x) for member in self.members], -2)

    def log_prob_given_context(self, u: Tensor, context: Tensor) -> Tensor:
        """``log (1/K) sum_k q_k(u | x)`` (with weights, ``log sum_k w_k q_k(u | x)``); ``context`` as returned by
        :meth:`context`."""
        parts = torch.stack([member.log_prob_given_context(u, context[..., k, :])
                             for k, member in enumerate(self.members)])
        if self.weights is None:
            return torch.logsumexp(parts, 0) - math.log(len(self.members))
        log_weights = self.weights.to(parts.dtype).log().reshape(-1, *[1] * (parts.dim() - 1))
        return torch.logsumexp(parts + log_weights, 0)

    def sample_given_context(self, n: int, context: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` mixture draws of ``u`` for each context row: ``(n, *batch, D)``."""
        base = self.flow.base
        a = self.u_shift
        noise = base.sample((n, *context.shape[:-2]), generator=generator).to(device=a.device, dtype=a.dtype)
        return self.sample_from_base(noise, context)

    def sample_from_base(self, noise: Tensor, context: Tensor) -> Tensor:
        """Mixture draws from :class:`EnsembleBase` noise ``(n, *batch, D + 1)`` for context ``(*batch, K, C)``."""
        z, pick = noise[..., :-1], noise[..., -1]
        members = len(self.members)
        if self.weights is None:
            which = (pick * members).long().clamp_(max=members - 1)  # (n, *batch)
        else:  # member k where pick falls in [w_0 + ... + w_(k-1), w_0 + ... + w_k)
            edges = self.weights.to(pick.dtype).cumsum(0)[:-1].contiguous()
            which = torch.searchsorted(edges, pick.contiguous(), right=True)
        batch = context.shape[:-2]
        flat_z = z.reshape(-1, z.shape[-1])
        flat_which = which.reshape(-1)
        # the context row of each draw: draws are laid out (n, *batch), so row r has batch index r % B
        rows = torch.arange(len(flat_z), device=z.device) % max(1, math.prod(batch))
        flat_context = context.reshape(-1, members, context.shape[-1])
        out = torch.empty_like(flat_z)
        for k, member in enumerate(self.members):
            chosen = torch.nonzero(flat_which == k).flatten()
            if len(chosen):
                out[chosen] = member.sample_from_base(flat_z[chosen][None], flat_context[rows[chosen], k])[0]
        return out.reshape(z.shape)

    def set_standardization(self, u: Tensor, x: Tensor) -> None:
        """Set every member's z-score statistics from the training rows."""
        for member in self.members:
            member.set_standardization(u, x)


def member_seed(seed: int, k: int) -> int:
    """The seed of ensemble member ``k`` (member 0 uses ``seed`` itself, so ``ensemble=1`` is a single flow).

    Example:
        >>> member_seed(7, 0), member_seed(7, 1) == member_seed(7, 2)
        (7, False)
    """
    return seed if k == 0 else derive_seed(seed, f"ensemble/{k}")


def mixture(members: list[PosteriorNet], weights: Any = None) -> PosteriorNet | EnsembleNet:
    """One network as itself, several as their :class:`EnsembleNet` (equal weights where ``weights`` is None; the
    inverse of :func:`members_of`)."""
    return members[0] if len(members) == 1 else EnsembleNet(members, weights=weights)


def check_weights(weights: Any, members: int) -> Tensor:
    """``weights`` as a float64 tensor of ``members`` mixture weights, or a ``ValueError`` naming what is wrong.

    Example:
        >>> check_weights([0.25, 0.75], 2)
        tensor([0.2500, 0.7500], dtype=torch.float64)
        >>> check_weights([0.5, 0.6], 2)
        Traceback (most recent call last):
        ...
        ValueError: weights must be 2 finite values >= 0 that sum to 1, got [0.5, 0.6]
    """
    try:
        values = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        values = None
    shown = [round(float(v), 6) for v in values.flatten()] if values is not None else repr(weights)
    if (values is None or values.shape != (members,) or not bool(torch.isfinite(values).all())
            or bool((values < 0).any()) or abs(float(values.sum()) - 1) > 1e-6):
        raise ValueError(f"weights must be {members} finite values >= 0 that sum to 1, got {shown}")
    return values / values.sum()


def weights_of(net: PosteriorNet | EnsembleNet) -> list[float] | None:
    """The mixture weights of ``net`` as a list, or None for a single flow or equal weights."""
    weights = getattr(net, "weights", None)
    return None if weights is None else [float(v) for v in weights]


def members_of(net: PosteriorNet | EnsembleNet) -> list[PosteriorNet]:
    """The flows of ``net``: an ensemble's members, or ``[net]`` for a single flow."""
    return list(net.members) if isinstance(net, EnsembleNet) else [net]


#: The string choices of ``NPE(ensemble=...)`` besides an int (:mod:`sbiflows.snapshots` for the last three).
ENSEMBLE_CHOICES = ("auto", "snapshots", "auto-snapshots", "auto-stacked")
#: :class:`~sbiflows.NPE`'s default ``ensemble``: one flow, mixed with two earlier snapshots of its own training
#: where it is over-confident on its validation rows, else its snapshots weighted by stacking on those rows
#: (``docs/benchmarks.md``, "Snapshot mixtures on the ten tasks" and "Snapshots weighted by stacking").
#: :class:`~sbiflows.TSNPE`'s rounds keep one flow.
DEFAULT_ENSEMBLE = "auto-stacked"


def check_ensemble(ensemble: object) -> int | str:
    """``ensemble`` as an int >= 1 or one of :data:`ENSEMBLE_CHOICES`, or a clear error naming the argument.

    Example:
        >>> check_ensemble(3), check_ensemble("auto"), check_ensemble("auto-snapshots")
        (3, 'auto', 'auto-snapshots')
    """
    if ensemble in ENSEMBLE_CHOICES:
        return ensemble
    named = [repr(choice) for choice in ENSEMBLE_CHOICES]
    choices = f"an int >= 1, {', '.join(named[:-1])} or {named[-1]}"
    if isinstance(ensemble, str):
        raise ValueError(f"ensemble must be {choices}, got {ensemble!r}")
    try:
        return check_int(ensemble, "ensemble", minimum=1)
    except (TypeError, ValueError) as error:  # the same message, naming the string choices too
        raise type(error)(str(error).replace("an int >= 1", choices)) from None


def auto_check(posterior: object, theta: Tensor, x: Tensor, *, seed: int) -> object:
    """The rule of ``ensemble="auto"``: is one flow over-confident on rows it did not train on?

    Expected coverage of the posterior's HPD regions on at most :data:`AUTO_ROWS` of the given rows
    (``NPE.fit`` passes the first flow's validation rows, which chose its early-stopping epoch but never
    trained it), one-sided: the flow fails when its coverage is below the nominal level by more than
    :data:`AUTO_SIGMAS` binomial standard deviations at any of the levels 0.05, ..., 0.95. The issue's
    target allows 3 on 300 datasets; 2.5 on up to 1,000 rows fires for an exact posterior in about 5%
    of fits and caught first flows that 3 missed (``docs/benchmarks.md``, "Ensembles only where one flow
    is over-confident"). With few rows (100 at 1,000 simulations) it finds only a large over-confidence.

    It differs from :func:`~sbiflows.diagnostics.expected_coverage` in two ways that make it cheap enough
    to run after every first flow without a tolerance: the HPD rank of ``theta_i`` among ``L =``
    :data:`AUTO_DRAWS` draws is randomized, ``(k + U) / (L + 1)`` with ``k`` the draws of higher density
    and ``U`` uniform, which is exactly uniform for a calibrated posterior (``k / L`` from few draws lowers
    the coverage of a calibrated posterior by up to ``1 / (L + 1)``); and densities skip the truncated
    space's normalizer (``log_prob_batched(..., normalized=False)``), a constant per observation that
    leaves ranks unchanged. The draws' densities come from the pass that drew them where the posterior
    has :meth:`~sbiflows.Posterior.sample_and_log_prob_batched`.

    Args:
        posterior: The first flow's :class:`~sbiflows.posterior.Posterior`.
        theta: Held-out parameters ``(N, D)``.
        x: Their simulations ``(N, *x_shape)``.
        seed: Seeds the choice of rows, the posterior draws and ``U`` (torch's global generator is untouched).

    Returns:
        A :class:`~sbiflows.diagnostics.CoverageResult` (``band``: :data:`AUTO_SIGMAS` standard deviations);
        ``passed`` False means "add members".
    """
    from sbiflows.diagnostics.coverage import DEFAULT_LEVELS, CoverageResult  # diagnostics import the posterior
    from sbiflows.posterior import observations_unchecked

    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(theta), generator=generator)[:AUTO_ROWS].to(theta.device)
    theta, x = theta[rows], x[rows]
    with observations_unchecked():  # held-out simulations: the range warning would only be noise
        if callable(getattr(posterior, "sample_and_log_prob_batched", None)):
            log_q = posterior.sample_and_log_prob_batched(AUTO_DRAWS, x, seed=seed, normalized=False)[1]  # (L, N)
        else:
            log_q = posterior.log_prob_batched(posterior.sample_batched(AUTO_DRAWS, x, seed=seed), x, normalized=False)
        log_q_truth = posterior.log_prob_batched(theta[None], x, normalized=False)
    higher = (log_q > log_q_truth).sum(0).cpu().double()  # (N,)
    ranks = (higher + torch.rand(len(higher), generator=generator, dtype=torch.float64)) / (AUTO_DRAWS + 1)
    levels = torch.tensor(DEFAULT_LEVELS, dtype=torch.float64)
    empirical = (ranks[None] < levels[:, None]).double().mean(1)
    band = AUTO_SIGMAS * (levels * (1 - levels) / len(ranks)).sqrt()
    passed = not bool((empirical < levels - band).any())
    return CoverageResult(levels=levels, empirical=empirical, band=band, hpd_ranks=ranks,
                          num_posterior_samples=AUTO_DRAWS, one_sided=True,
                          verdict="calibrated" if passed else "over-confident", passed=passed)


def stack(members: list[PosteriorNet], prior: Any, config: dict, theta: Tensor, x: Tensor,
          **options: Any) -> tuple[list[int], Tensor]:
    """Which of ``members`` a likelihood-stacked mixture keeps, and their weights: the mixture weights that
    maximize the mixture's log density at the held-out pairs ``(theta, x)``
    (:func:`~sbiflows.snapshots.stacking_weights`, whose ``options`` these are), without the members they drop.

    Densities are the members' unnormalized ones (``log_prob_batched(..., normalized=False)``): their Jacobian
    is common to all members, and the truncated space's normalizer, which is not, is ignored (it is the mass the
    flow puts outside the box, near 0 for a trained flow).

    Args:
        members: Networks of one architecture (e.g. a training run's snapshots).
        prior: The prior of the posteriors they define.
        config: The posterior config of one member (``ensemble`` is set to 1 here).
        theta: Held-out parameters ``(N, D)`` (rows that did not train the members).
        x: Their simulations ``(N, *x_shape)``.

    Returns:
        The indices of the members kept and their weights (float64, summing to 1).
    """
    from sbiflows.posterior import Posterior, observations_unchecked
    from sbiflows.snapshots import stacking_weights

    with observations_unchecked():  # held-out simulations: the range warning would only be noise
        log_q = torch.stack([Posterior(member, prior, config={**config, "ensemble": 1})
                             .log_prob_batched(theta[None], x, normalized=False)[0] for member in members])
    weights = stacking_weights(log_q.cpu(), **options)
    kept = [k for k in range(len(members)) if float(weights[k]) > 0]
    return kept, weights[kept]


def auto_summary(result: object) -> dict:
    """What a posterior's config records of :func:`auto_check`: rows, verdict, and the most negative
    ``z = (coverage - level) / sqrt(level (1 - level) / rows)`` with its level.

    Example:
        >>> from sbiflows.diagnostics.coverage import CoverageResult
        >>> levels = torch.tensor([0.5, 0.9])
        >>> result = CoverageResult(levels=levels, empirical=torch.tensor([0.45, 0.80]), band=torch.zeros(2),
        ...                         hpd_ranks=torch.rand(100), num_posterior_samples=500, one_sided=True,
        ...                         verdict="over-confident", passed=False)
        >>> auto_summary(result)
        {'rows': 100, 'over_confident': True, 'worst_z': -3.33, 'level': 0.9}
    """
    levels = result.levels.double()
    z = (result.empirical.double() - levels) / (levels * (1 - levels) / result.num_datasets).sqrt()
    worst = int(z.argmin())
    return {"rows": result.num_datasets, "over_confident": not result.passed, "worst_z": round(float(z[worst]), 2),
            "level": round(float(levels[worst]), 2)}

"""Truncated sequential NPE (TSNPE, Deistler et al. 2022): fewer simulations for one observation.

Round 0 simulates from the prior and trains NPE. Round ``r >= 1`` draws its parameters from the prior
truncated to the highest-density region of the current posterior estimate for ``x_o``
(:class:`~sbiflows.truncation.TruncatedPrior`), simulates them and trains the same NPE on all rounds so
far (``NPE.fit`` appends the rows and continues from the current weights; earlier rows keep their side
of the validation split, so a round is never validated on rows an earlier round trained on). Inside the
region the proposal is proportional to the prior, so the plain NPE loss needs no correction; the final
posterior is NPE's posterior for ``x_o`` as long as every region holds the posterior's mass, which the
threshold (``1 - quantile`` of ``q``'s mass) makes very likely.

**Budget.** ``simulations`` is the total over the rounds. Without ``first_round`` it is split equally
(the paper's and sbi's tutorial's choice), the remainder going one each to the earliest rounds;
``first_round=n`` gives round 0 ``n`` simulations (a larger first round makes the first region more
reliable) and splits the rest equally over the later rounds.

**Store and resume.** With ``store=PATH`` the run keeps, under ``PATH``::

    tsnpe.json                the settings and one record per finished round (written atomically)
    round_<r>/theta.npy       the round's parameters, written before simulating them
    round_<r>/simulations.zarr  the round's simulation store (chunk by chunk, see sbiflows.simulate)
    round_<r>/posterior.pt    the posterior after training on rounds 0..r
    round_<r>/validation.npy  which of those rows validated (kept on that side by later rounds; one row per flow
                              of an ensemble)
    round_<r>/histories.json  an ensemble's training histories, one per flow (the posterior file keeps the first)
    round_<r>/training.ckpt   while the round trains: its checkpoint (sbiflows.checkpoint), removed with posterior.pt
    check/                    the final coverage check's parameters and simulations

Rerunning the same call resumes: finished rounds are read back (their rows and the last posterior,
whose weights and training history the NPE continues from), an unfinished round's parameters are read
from ``theta.npy``, its simulation store simulates only the missing chunks and its training resumes from its
checkpoint. A store made with other
settings is refused with a ``ValueError``.

**Checks.** A round whose region holds at least ``COVERS_PRIOR`` of the prior's mass is flagged
(``covers_prior``): truncation did not narrow anything there, and more simulations per round (or fewer
rounds) would help. After the last round, the paper's check: expected coverage of the HPD regions with
parameters drawn from the last round's proposal and fresh simulations (``check_simulations``, outside
the budget). It detects a posterior that is over- or under-confident *inside* the region. It cannot
detect posterior mass that a region cut off, since every test parameter lies inside it; nor does it
test other observations than those the region produces.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from sbiflows.checkpoint import CHECKPOINT_FILE, Checkpoint
from sbiflows.checks import as_float_tensor, caller_level, check_int
from sbiflows.diagnostics.coverage import CoverageResult, expected_coverage
from sbiflows.engine.names import simulator_name
from sbiflows.npe import NPE
from sbiflows.posterior import Posterior, load
from sbiflows.prior_specs import prior_spec
from sbiflows.priors import sample_seeded
from sbiflows.seeding import derive_seed
from sbiflows.serialization import read_history
from sbiflows.sequential_rounds import COVERS_PRIOR, Round, check_sequential_options, split_budget
from sbiflows.sequential_store import RoundStore, atomic_npy, atomic_text
from sbiflows.simulate import (
    SimulationResult,
    load_simulations,
    simulate,
)
from sbiflows.training_data import MIN_VALID
from sbiflows.training_options import check_fit_options, split_sizes
from sbiflows.truncated_space import resolve_space
from sbiflows.truncation import TruncatedPrior

__all__ = ["COVERS_PRIOR", "TSNPE", "Round", "check_sequential_options", "split_budget"]

#: The signature the rounds' fit options are checked against (the method as defined, even if wrapped later).
_NPE_FIT = NPE.fit
#: Early-stopping patience of every round's fit unless ``fit_options`` says otherwise (NPE's default is 20).
#: Later rounds continue from the earlier weights, and stopped too early with
#: 10: on the narrow Gaussian of ``tests/test_sequential_accuracy.py`` (seed 0) C2ST went from 0.558 with
#: patience 10 to 0.513 with 30 (see docs/benchmarks.md).
PATIENCE = 30


class TSNPE:
    """Truncated sequential neural posterior estimation for one observation (see the module docstring).

    Args:
        prior: The prior (as for :class:`~sbiflows.NPE`).
        **npe_options: Passed to :class:`~sbiflows.NPE` (``estimator``, ``transforms``, ...) except
            ``balancing`` and ``coverage_penalty`` (:func:`check_sequential_options`). ``ensemble`` defaults to
            1 here (one flow per round; NPE's default snapshot mixtures widened regions). With ``ensemble=K``
            every round trains K flows and each region is their mixture's (wider where the flows
            disagree, so less prone to cutting off posterior mass; docs/sequential.md). The flow
            defaults to
            NPE's (the spline flow, ``"nsf"``); for a posterior hundreds of times narrower than the prior
            the affine MAF (``estimator="maf"``) fits better (docs/sequential.md).

    Attributes:
        npe: The :class:`~sbiflows.NPE` trained over the rounds.
        rounds: One :class:`Round` per finished round (after :meth:`run`, also after one that raised).
        posterior: The posterior after the last finished round (None before).
        proposals: The proposal of each round (the prior, then :class:`~sbiflows.truncation.TruncatedPrior`).
        check: The final :class:`~sbiflows.diagnostics.CoverageResult` (None when skipped or not reached).
        reused: What the latest :meth:`run` took from its store instead of computing it (finished rounds, a
            round's stored simulations, a round's training resumed from its checkpoint), one phrase each.

    Example:
        >>> from sbiflows import box_uniform
        >>> prior = box_uniform([-2.0, -2.0], [2.0, 2.0])
        >>> simulator = lambda theta: theta + 0.1 * torch.randn_like(theta)
        >>> tsnpe = TSNPE(prior, transforms=2, hidden_features=(20, 20))
        >>> posterior = tsnpe.run(simulator, torch.tensor([0.5, 0.0]), rounds=2, simulations=600,
        ...                       threshold_samples=20_000, quantile=1e-3, check_simulations=0,
        ...                       fit_options={"max_epochs": 20})
        >>> posterior.sample(1000).shape  # x defaults to x_o
        torch.Size([1000, 2])
        >>> [r.simulations for r in tsnpe.rounds], tsnpe.rounds[1].volume < 0.5
        ([300, 300], True)
    """

    def __init__(self, prior: Distribution, **npe_options: Any):
        check_sequential_options(npe_options)
        self.prior = prior
        # rounds keep one flow unless told otherwise: NPE's default mixes snapshots where a flow is
        # over-confident, and per round that kept regions too wide (docs/benchmarks.md, "slcp at 1,000:
        # snapshot mixtures per round"); every round did so before that default, so their stores resume
        # checks the prior and the options now, before any simulation
        self.npe = NPE(prior, **{"ensemble": 1, **npe_options})
        # what a store records: the options as given plus the flow they resolve to, so that a run stored
        # under another default flow is refused rather than resumed with a different network
        self._npe_options = {"estimator": self.npe.estimator, **npe_options}
        self.rounds: list[Round] = []
        self.posterior: Posterior | None = None
        self.proposals: list[Distribution] = []
        self.check: CoverageResult | None = None
        self.reused: list[str] = []

    def run(
        self,
        simulator: Callable,
        x_o: Any,
        *,
        rounds: int = 5,
        simulations: int = 10_000,
        seed: int = 0,
        first_round: int | None = None,
        quantile: float = 1e-4,
        threshold_samples: int = 1_000_000,
        min_acceptance: float = 1e-3,
        oversampling: int = 1024,
        check_simulations: int = 200,
        check_samples: int = 500,
        fit_options: Mapping[str, Any] | None = None,
        store: str | os.PathLike | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
        **simulate_options: Any,
    ) -> Posterior:
        """Run the rounds and return the final posterior for ``x_o``.

        Args:
            simulator: As for :func:`sbiflows.simulate`.
            x_o: The observation, ``(x_dim,)`` (or ``(1, x_dim)``); checked against the simulations'
                shape after round 0's simulations (which a store keeps), before any training.
            rounds: Number of rounds (``>= 1``; 1 is amortized NPE on the prior).
            simulations: Total simulation budget, split by :func:`split_budget`: round 0 trains, so it needs at
                least 2 (a training and a validation row), every other round at least 1.
            seed: Seeds every step (each round's draws, simulations and training get their own stream).
            first_round: Simulations of round 0 (None: an equal share).
            quantile: Share of the posterior's mass left outside each region (``epsilon``, default 1e-4).
            threshold_samples: Posterior draws per region for its threshold and volume (default 10^6).
            min_acceptance: Rejection from the prior while a region's volume is at least this, SIR below
                (see :class:`~sbiflows.truncation.TruncatedPrior`).
            oversampling: SIR candidates per sample.
            check_simulations: Fresh simulations for the final coverage check (0: skip it); not part
                of ``simulations``.
            check_samples: Posterior draws per dataset in that check.
            fit_options: Keyword options of :meth:`sbiflows.NPE.fit` (``max_epochs``, ...); ``seed`` and
                ``progress`` are set by the run, ``patience`` defaults to :data:`PATIENCE` (30) and
                ``drop_patience`` to ``patience``.
            store: Folder to keep every round in and to resume from (see the module docstring).
            progress: Progress bars for simulating and training.
            log: Called with one line per step (e.g. ``print``); None: silent.
            **simulate_options: :func:`sbiflows.simulate` options: ``workers``, ``executor``,
                ``timeout``, ``batch_size``, ``on_error``, ``vectorized``, ``retry_failed``.

        Returns:
            The posterior after the last round, with ``default_x = x_o``: ``sample(n)`` and
            ``log_prob(theta)`` use ``x_o``. For another ``x`` it is only valid inside the last round's
            truncated region (it was trained on parameters from there only). Its ``config["tsnpe"]``
            holds the per-round records, so the saved file remembers them.

        Raises:
            ValueError, TypeError: Bad arguments (before anything runs), an ``x_o`` that does not
                match the simulations, or a store made with other settings.
            SimulationError: A round's simulator cannot run (earlier rounds stay in :attr:`rounds`,
                :attr:`posterior` and the store).
        """
        rounds = check_int(rounds, "rounds", minimum=1)
        budget = split_budget(simulations, rounds, first_round)
        seed = check_int(seed, "seed")
        check_simulations = check_int(check_simulations, "check_simulations", minimum=0)
        check_samples = check_int(check_samples, "check_samples", minimum=1)
        if not callable(simulator):
            raise TypeError(f"simulator must be callable, got {type(simulator).__name__}")
        x_o = as_float_tensor(x_o, "x_o", dtype=self.npe.dtype if getattr(x_o, "dtype", None) != torch.float64
                              else torch.float64, device=self.npe.device)
        if x_o.ndim == 2 and x_o.shape[0] == 1:
            x_o = x_o[0]
        if x_o.ndim != 1 or not bool(torch.isfinite(x_o).all()):
            raise ValueError(f"x_o must be one finite observation of shape (x_dim,), got shape {tuple(x_o.shape)}"
                             + ("" if x_o.ndim != 1 else " with NaN or inf"))
        if budget[0] < MIN_VALID:
            raise ValueError(f"the first round needs at least {MIN_VALID} simulations (a training and a validation "
                             f"row), got {budget[0]} of simulations={simulations} over rounds={rounds}")
        _check_embedding(self._npe_options.get("embedding_net"), x_o)
        fit_options = {"patience": PATIENCE, **(fit_options or {})}
        for key in ("seed", "progress", "checkpoint"):
            if key in fit_options:
                raise ValueError(f"fit_options must not set {key!r}: the run sets it")
        # before round 0 simulates, against its budget (failed simulations can leave fewer rows: _fitting_batch)
        check_fit_options(fit_options, _NPE_FIT, set_by_caller=("seed", "progress", "checkpoint"), rows=budget[0])
        # the truncation options are checked now (by a TruncatedPrior's own rules), before simulating
        truncation = dict(zip(("quantile", "num_threshold_samples", "min_acceptance", "oversampling"),
                              TruncatedPrior.check_options(quantile=quantile, num_threshold_samples=threshold_samples,
                                                           min_acceptance=min_acceptance, oversampling=oversampling)))
        allowed = ("workers", "executor", "timeout", "batch_size", "on_error", "vectorized", "retry_failed")
        unknown = sorted(set(simulate_options) - set(allowed))
        if unknown:
            raise TypeError(f"run got unexpected keyword arguments {unknown}; the simulate options it passes on are "
                            f"{list(allowed)}")
        say = log or (lambda line: None)
        layout = RoundStore(store, _settings(self, simulator, x_o, budget, seed, truncation, fit_options,
                                          simulate_options), comparable=self._comparable) if store is not None else None
        self.rounds, self.proposals, self.check, self.reused, self.posterior = [], [], None, [], None
        if self.npe.theta is not None:  # a second run starts over (or from its store), not from the first's rows
            self.npe = NPE(self.prior, **{"ensemble": 1, **self._npe_options})
        start = self._resume(layout, say, rounds) if layout is not None else 0
        for r in range(start, rounds):
            self._round(r, budget[r], simulator, x_o, seed, truncation, fit_options, layout, progress, say,
                        simulate_options)
        if check_simulations:
            self._final_check(simulator, check_simulations, check_samples, seed, truncation, layout, progress, say,
                              simulate_options)
        return self.posterior

    def _comparable(self, stored: dict, settings: dict) -> tuple[dict, dict]:
        """A store's settings and this run's as a resume compares them: NPE's options as the network they make
        (:func:`_canonical_options`, also for stores that recorded them as spelled), and the prior by its
        parameters alone where both describe it so (its repr shows attributes torch caches when they are first
        read, such as a ``MultivariateNormal``'s ``scale_tril``)."""
        pair = (dict(stored), dict(settings))
        for out in pair:
            if isinstance(out.get("npe_options"), dict):
                out["npe_options"] = _canonical_options(self, out["npe_options"])
        if all(re.fullmatch(r"\w+:[0-9a-f]{16}", str(out.get("prior_identity"))) for out in pair):
            for out in pair:
                out.pop("prior", None)
        return pair

    # ------------------------------------------------------------------------------ one round
    def _round(self, r, n, simulator, x_o, seed, truncation, fit_options, layout, progress, say,
               simulate_options) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        theta_file = None if layout is None else layout.round(r) / "theta.npy"
        if r == 0:
            proposal: Distribution = self.prior
        else:
            proposal = TruncatedPrior(self.prior, self.posterior, x_o, seed=derive_seed(seed, f"tsnpe/region/{r}"),
                                      **truncation)
        self.proposals.append(proposal)
        if theta_file is not None and theta_file.exists():
            theta = torch.from_numpy(np.load(theta_file))
            # round 1 is the prior's (its record is gone where force kept only its draws and simulations)
            method, acceptance = ("prior", 1.0) if r == 0 else layout.stored_draw(r)
        else:
            theta, method, acceptance = _draw(proposal, n, derive_seed(seed, f"tsnpe/proposal/{r}"))
            if theta_file is not None:  # the record first: a kill between the two redraws the same seeded draws
                layout.note_draw(r, method, acceptance)
                atomic_npy(theta_file, theta.cpu().numpy())
        volume = 1.0 if r == 0 else proposal.volume
        say(f"round {r + 1}: {n} simulations from "
            + ("the prior" if r == 0 else f"the truncated prior (volume {volume:.3g} of the prior, {method}, "
                                          f"acceptance {acceptance:.3g})"))
        sims = simulate(simulator, theta, seed=derive_seed(seed, f"tsnpe/simulate/{r}"), progress=progress,
                        store=None if layout is None else layout.round(r) / "simulations.zarr", **simulate_options)
        valid = sims.valid
        if sims.reused:
            self.reused.append(f"{sims.reused} of {len(theta)} simulations of round {r + 1} (read from its store)")
        _check_x_o(x_o, sims)
        # a new network (retrain_from_scratch) starts a new history
        epochs_before = 0 if self.npe.history is None or fit_options.get("retrain_from_scratch") else \
            self.npe.history.epochs
        options = _fitting_batch(r, {"drop_patience": fit_options["patience"], **fit_options},
                                 rows=int(valid.sum()) + (0 if self.npe.theta is None else len(self.npe.theta)),
                                 failed=int((~valid).sum()))
        checkpoint = None if layout is None else Checkpoint(layout.round(r) / CHECKPOINT_FILE,
                                                            log=lambda line: say(f"         {line}; epochs "
                                                                                 "count over all rounds"))
        with _observations_quiet():
            posterior = self.npe.fit(sims.theta[valid], sims.x[valid].reshape(int(valid.sum()), -1),
                                     seed=seed if r == 0 else derive_seed(seed, f"tsnpe/train/{r}"),
                                     progress=progress, checkpoint=checkpoint, **options)
        history = posterior.history
        record = Round(
            index=r, simulations=len(theta), failed=int((~valid).sum()), method=method, acceptance=float(acceptance),
            volume=float(volume), volume_stderr=0.0 if r == 0 else float(proposal.volume_stderr),
            threshold=None if r == 0 else float(proposal.threshold), covers_prior=volume >= COVERS_PRIOR and r > 0,
            validation_loss=float(history.best_validation_loss), epochs=int(history.epochs - epochs_before),
            seconds=time.perf_counter() - wall, cpu_seconds=time.process_time() - cpu,
            restart_epochs=list(history.restart_epochs),
        )
        self.rounds.append(record)
        self.posterior = self._finish(posterior, x_o)
        if layout is not None:
            # one split per flow: (N,) for a single flow (the format of earlier versions), (K, N) for K flows
            masks = self.npe.validations
            atomic_npy(layout.round(r) / "validation.npy", (masks[0] if len(masks) == 1 else masks).numpy())
            if len(masks) > 1:  # a saved posterior keeps only the first flow's training history
                atomic_text(layout.round(r) / "histories.json",
                            json.dumps([h.as_dict() for h in self.npe.histories]))
            self.posterior.save(layout.round(r) / "posterior.pt", allow_unsaved_prior=prior_spec(self.prior) is None)
            layout.finish_round(record)
            if checkpoint is not None:
                self.reused += [f"round {r + 1}'s training up to epoch {part.resumed_epoch} (epochs over all rounds; "
                                f"{part.path.name})" for part in checkpoint.resumed_parts()]
                checkpoint.remove()  # the round's posterior.pt holds what it led to
        say(f"         {sims.summary()}; trained {record.epochs} epochs, best validation loss "
            f"{record.validation_loss:.3f}" + ("; the region covers (almost) the whole prior: truncation had no "
                                               "effect in this round" if record.covers_prior else ""))

    def _finish(self, posterior: Posterior, x_o: Tensor) -> Posterior:
        posterior.set_default_x(x_o)
        posterior.config = dict(posterior.config, tsnpe={"rounds": [asdict(r) for r in self.rounds]})
        return posterior

    # ------------------------------------------------------------------------------- resuming
    def _resume(self, layout: RoundStore, say, rounds: int) -> int:
        records = layout.finished()
        if not records:
            return 0
        last = len(records) - 1
        posterior = load(layout.round(last) / "posterior.pt", prior=self.prior)
        thetas, xs = [], []
        for r in range(len(records)):
            Checkpoint(layout.round(r) / CHECKPOINT_FILE).remove()  # left if a run stopped right after the round
            sims = load_simulations(layout.round(r) / "simulations.zarr")
            valid = sims.valid
            thetas.append(sims.theta[valid])
            xs.append(sims.x[valid].reshape(int(valid.sum()), -1))
        split = layout.round(last) / "validation.npy"  # absent in stores of older versions: a random split
        saved_histories = layout.round(last) / "histories.json"  # an ensemble's K histories
        histories = ([read_history(fields, saved_histories) for fields in json.loads(saved_histories.read_text())]
                     if saved_histories.exists() else None)
        self.npe.restore(posterior, torch.cat(thetas), torch.cat(xs),
                         validation=torch.from_numpy(np.load(split)) if split.exists() else None,
                         histories=histories)
        self.rounds = [Round(**record) for record in records]
        self.proposals = [self.prior] + [None] * last  # the regions of finished rounds are not rebuilt
        self.posterior = posterior
        say(f"all {rounds} rounds finished earlier: reusing them from {layout.root}" if last + 1 >= rounds
            else f"resuming after round {last + 1} from {layout.root}")
        self.reused.append(f"round{'s 1-' if last else ' '}{last + 1} (simulations and posterior, {layout.root.name}/)")
        return len(records)

    # ------------------------------------------------------------------------------ the check
    def _final_check(self, simulator, n, samples, seed, truncation, layout, progress, say, simulate_options) -> None:
        folder, stored = None if layout is None else layout.root / "check", None
        if folder is not None:
            folder.mkdir(exist_ok=True)
            if (folder / "theta.npy").exists():
                stored = torch.from_numpy(np.load(folder / "theta.npy"))
        if stored is not None and len(stored) >= n:  # an earlier run's check: its first rows, no region rebuilt
            theta = stored
        else:
            proposal = self.proposals[-1]
            if proposal is None:  # resumed after the last round: rebuild the last region
                r = len(self.rounds) - 1
                proposal = self.prior if r == 0 else TruncatedPrior(
                    self.prior, load(layout.round(r - 1) / "posterior.pt", prior=self.prior), self.posterior.default_x,
                    seed=derive_seed(seed, f"tsnpe/region/{r}"), **truncation)
            if stored is None:
                theta, _, _ = _draw(proposal, n, derive_seed(seed, "tsnpe/check/proposal"))
            else:  # a larger check than the earlier run's: its rows first, then new ones
                extra, _, _ = _draw(proposal, n - len(stored), derive_seed(seed, f"tsnpe/check/proposal/{len(stored)}"))
                theta = torch.cat([stored, extra.to(stored.dtype)])
            if folder is not None:
                atomic_npy(folder / "theta.npy", theta.numpy())
        theta = theta[:n]
        sims = simulate(simulator, theta, seed=derive_seed(seed, "tsnpe/check/simulate"), progress=progress,
                        store=None if folder is None else folder / "simulations.zarr", **simulate_options)
        if sims.reused:
            self.reused.append(f"{sims.reused} of {len(theta)} simulations of the final check (read from its store)")
        valid = sims.valid
        self.check = expected_coverage(self.posterior, theta=sims.theta[valid],
                                       x=sims.x[valid].reshape(int(valid.sum()), -1).to(self.posterior.dtype),
                                       num_posterior_samples=samples, seed=seed)
        say("final check (expected coverage, parameters from the last truncated prior):\n" + str(self.check))


# ------------------------------------------------------------------------------------ internals
def _draw(proposal: Distribution, n: int, seed: int) -> tuple[Tensor, str, float]:
    """``n`` draws of ``proposal`` on the CPU, where the simulator and the stores take them (as when read back from a
    store), whatever the network's device; the method and the acceptance of the draw."""
    if isinstance(proposal, TruncatedPrior):
        theta = proposal.sample((n,), seed=seed)
        return theta.cpu(), proposal.last_draw.method, proposal.last_draw.acceptance
    theta = sample_seeded(proposal, (n,), seed)  # an initialized CUDA generator is forked too
    return theta.reshape(n, -1).cpu(), "prior", 1.0


def _check_x_o(x_o: Tensor, sims: SimulationResult) -> None:
    shape = tuple(sims.x.shape[1:])
    if x_o.numel() != int(np.prod(shape)) or (len(shape) == 1 and tuple(x_o.shape) != shape):
        raise ValueError(f"x_o has shape {tuple(x_o.shape)} but the simulator returns x of shape {shape} (the "
                         "simulations are kept" + (f" in {sims.store})" if sims.store else ")"))


def _check_embedding(embedding_net: object, x_o: Tensor) -> None:
    """A TSNPE trains on flat x: an ``embedding_net`` (a module, or a built-in's name) must take ``(B, x_dim)``,
    checked on ``x_o`` (in the network's dtype) before round 0 simulates (it failed in round 0's training)."""
    if isinstance(embedding_net, str) and embedding_net != "auto":
        from sbiflows.embeddings import from_name

        try:
            from_name(embedding_net, (len(x_o),))
        except ValueError as error:
            raise ValueError(f"embedding_net {embedding_net!r} cannot take flat x of shape ({len(x_o)},), as TSNPE "
                             f"trains on flattened x: {error}") from None
        return
    if not isinstance(embedding_net, torch.nn.Module):
        return
    dtype = next((p.dtype for p in itertools.chain(embedding_net.parameters(), embedding_net.buffers())
                  if p.is_floating_point()), x_o.dtype)
    try:
        with torch.no_grad():
            embedding_net(x_o[None].to(dtype))
    except Exception as error:  # noqa: BLE001 - any failure of the user's network is the same refusal
        raise ValueError(f"embedding_net must take flat x of shape (B, {len(x_o)}), as TSNPE trains on flattened x, "
                         f"but it failed on x_o of shape (1, {len(x_o)}): {type(error).__name__}: {error}") from None


def _observations_quiet():
    from sbiflows.observation_range import observations_unchecked

    return observations_unchecked()


def _fitting_batch(r: int, options: dict, *, rows: int, failed: int) -> dict:
    """``options`` with a ``batch_size`` larger than the round's training rows lowered to them, with a warning.

    ``run`` checked it against the round-0 budget before simulating; only failed simulations can leave
    fewer rows, and refusing then would stop a run whose simulations are paid for.
    """
    batch = options.get("batch_size")
    n_train = split_sizes(rows, options.get("validation_fraction", 0.1))[0]
    if batch is None or batch <= n_train:
        return options
    warnings.warn(f"round {r + 1}: batch_size={batch} is more than the {n_train} training rows left after {failed} "
                  f"failed simulations; the round trains with batches of {n_train}", UserWarning,
                  stacklevel=caller_level())
    return {**options, "batch_size": n_train}


def _canonical_options(tsnpe: TSNPE, options: dict) -> dict:
    """``options`` without those that say what leaving them out says (``ensemble=1``, NPE's defaults, a ``space`` that
    resolves as ``"auto"`` does), so that a store compares what the network is, not how it was spelled."""
    from sbiflows.report import jsonable

    defaults = {name: p.default for name, p in inspect.signature(NPE.__init__).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY} | {"ensemble": 1}
    support = tsnpe.npe.prior.support

    def implied(key: str, value: Any) -> bool:
        if key == "space":
            return resolve_space(support, value) == resolve_space(support, "auto")
        return key in defaults and key != "estimator" and jsonable(value) == jsonable(defaults[key])

    return {key: value for key, value in options.items() if not implied(key, value)}


def _settings(tsnpe: TSNPE, simulator, x_o, budget, seed, truncation, fit_options, simulate_options) -> dict:
    """What a store's rounds depend on (a resumed run must match them)."""
    from sbiflows.pipeline_resume import prior_identity
    from sbiflows.report import jsonable

    return jsonable({
        "simulator": simulator_name(simulator), "x_o": x_o.tolist(), "budget": budget, "seed": seed,
        "truncation": truncation, "fit_options": fit_options,
        "npe_options": _canonical_options(tsnpe, {k: v for k, v in tsnpe._npe_options.items() if k != "device"}),
        "batch_size": simulate_options.get("batch_size", 1000), "prior": repr(tsnpe.prior),
        "prior_identity": prior_identity(tsnpe.prior),  # the repr of a box prior does not show its bounds
    })

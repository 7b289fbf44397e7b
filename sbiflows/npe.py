"""Neural posterior estimation (NPE): train a conditional flow ``q(theta | x)`` on simulations.

Maximizing ``sum_i log q(theta_i | x_i)`` over pairs with ``theta_i ~ prior``, ``x_i ~ simulator(theta_i)``
makes ``q(theta | x)`` approximate the posterior ``p(theta | x)`` for every ``x`` at once (amortized
inference). Beyond that fit (details and measured reasons in ``docs/guide.md``, "The Python API"):

* **Space**: the flow models ``u = T^{-1}(theta)`` (``T = biject_to(prior.support)``) for a prior with
  an unbounded parameter, and theta restricted to the box for a box prior (:mod:`sbiflows.truncated_space`).
* **z-scoring** of ``u`` and ``x`` with the first ``fit``'s valid training rows (a constant ``x``
  dimension gets std 1 and a warning); **structured x**
  ``(N, *x_shape)`` goes to an embedding net (:mod:`sbiflows.embeddings`, :mod:`sbiflows.xshape`).
* **Refitting** appends rows and trains on from the current weights; each ``fit`` returns an
  independent :class:`~sbiflows.posterior.Posterior`.
* **Transactional fits**: a ``fit`` that raised leaves the object as it was, its best weights in
  ``NPE.partial_posterior``.
* **Ensembles** (:mod:`sbiflows.ensemble`), batches from the budget and one thread
  (:func:`sbiflows.training.default_batch_size`, :mod:`sbiflows.threads`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from sbiflows.balance import BalancedObjective
from sbiflows.checkpoint import Checkpoint, as_checkpoint, say_on_stderr
from sbiflows.coverage_loss import CalibratedObjective
from sbiflows.embeddings import EMBEDDINGS
from sbiflows.checks import check_bool, check_choice, check_device, check_int, check_real
from sbiflows.ensemble import (
    AUTO_MEMBERS, DEFAULT_ENSEMBLE, EnsembleNet, auto_check, auto_summary, check_ensemble, member_seed, members_of, mixture,
)
from sbiflows.estimator import DEFAULT_ESTIMATOR, PosteriorNet, default_transforms
from sbiflows.flows import Flow
from sbiflows.npe_fit import train_flows
from sbiflows.npe_network import build_network, check_network_options, network_config, partial_posterior
from sbiflows.npe_restore import SNAPSHOT_CHOICES, restored_state
from sbiflows.posterior import Posterior
from sbiflows.prior_specs import move_prior
from sbiflows.priors import check_prior, prior_device
from sbiflows.snapshots import SnapshotTrail
from sbiflows.threads import resolve_threads, torch_threads
from sbiflows.training import (
    MAX_EPOCHS,
    NONFINITE_CHOICES,
    TrainingHistory,
    check_training_options,
    negative_log_likelihood,
    split_sizes,
)
from sbiflows.training_data import check_training_data, duplicate_groups
from sbiflows.training_options import batch_options, check_batch_fits, fit_validation
from sbiflows.truncated_space import SPACE_OPTIONS, make_space, resolve_space

__all__ = ["NPE"]


class NPE:
    """Neural posterior estimation with a normalizing flow.

    Args:
        prior: The prior over ``theta``, a ``torch.distributions.Distribution`` with event shape
            ``(D,)`` (e.g. ``Independent(Uniform(low, high), 1)``, ``MultivariateNormal``) or a scalar /
            batch-of-scalars distribution (treated as ``D`` independent parameters).
        estimator: ``"maf"`` (masked autoregressive flow), ``"nsf"`` (neural spline flow: spline
            couplings; with ``D = 1`` the splines' parameters come from ``x`` alone), ``"realnvp"``
            (couplings, needs ``D >= 2`` unless splines) or a callable ``(features, context_features) -> Flow``.
            Default ``"nsf"`` (``docs/benchmarks.md``, "Defaults from all ten tasks").
        transforms: Number of flow layers. None (default): :func:`~sbiflows.estimator.default_transforms` at
            the first ``fit`` (10 from 5,000 training rows with >= 3 parameters, else 5). Not for a callable.
        hidden_features: Hidden layer sizes of each layer's network (default ``(50, 50)``; wider
            networks were measured in ``docs/benchmarks.md``). Ignored for a callable estimator.
        activation: Their activation: ``"tanh"`` (default; it keeps the flow bounded for observations outside
            the training range), ``"relu"``, ``"elu"`` or ``"gelu"``. Ignored for a callable estimator.
        transformer: The elementwise map of the flow's layers: ``"affine"`` or ``"spline"``
            (monotonic rational-quadratic splines, Durkan et al. 2019). None (default): ``"spline"``
            for ``"nsf"``, ``"affine"`` for ``"maf"`` and ``"realnvp"``. Named estimators only.
        bins: Spline bins (default 8; sbi's ``nsf`` uses 10); only with a spline transformer.
        bound: Splines act on ``[-bound, bound]`` of the flow's standardized space and are the
            identity outside (default 5.0; sbi's ``nsf`` uses 3.0); only with a spline transformer.
        mixing: How the coupling estimators (``"nsf"``, ``"realnvp"``) mix dimensions: ``"none"`` (default;
            the masks alternate), ``"lu"`` (an LU-linear layer after each coupling, as in sbi's ``nsf``)
            or ``"masks"`` (masks cycling through binary digits; :func:`~sbiflows.flows.realnvp`). Saved
            with the posterior.
        embedding_net: An ``nn.Module`` mapping z-scored ``x`` ``(B, *x_shape)`` to ``(B, C)`` before
            the flow, trained jointly; its output size ``C`` is read from a forward pass on the data. It is
            deep-copied at the first ``fit``, so the module you pass is never modified. The built-in ones
            (:mod:`sbiflows.embeddings`: ``MLP``, ``Linear``, ``CNN1d``, ``CNN2d``, ``PermutationInvariant``)
            are saved with the posterior; a module of your own is passed back to :func:`sbiflows.load`.
            ``"auto"`` (default): a learned linear summary for ``x`` with many values per parameter, none
            otherwise (:func:`~sbiflows.embeddings.auto_embedding`, decided at the first ``fit``); a built-in's
            name (``"mlp"``, ``"linear"``, ``"cnn1d"``, ``"cnn2d"``, ``"set"``): that network sized for the
            first fit's ``x`` (:func:`~sbiflows.embeddings.from_name`), each ensemble member's with its own
            initial weights (a module passed in starts every member from its weights); None: no
            embedding (``x`` goes to every flow layer as it is, structured ``x`` flattened).
        ensemble: ``"auto-stacked"`` (default, below), or train this many flows on the same rows with
            different seeds (weights, validation split, minibatch order) and return their equal-weight
            mixture (:mod:`sbiflows.ensemble`); 1: one flow.
            The flows step together, one vectorized pass per minibatch, unless a custom objective
            (``balancing``, ``coverage_penalty``) or the network rules it out
            (:mod:`sbiflows.ensemble_training`); either way each trains as it would alone.
            ``"auto"``: one flow, and three when that flow is over-confident on its own validation rows
            (:func:`~sbiflows.ensemble.auto_check`, kept in :attr:`auto_coverage`); the first fit decides.
            ``"snapshots"``: one flow trained as the default is, and the mixture of its best weights with
            two earlier snapshots of its own training (:mod:`sbiflows.snapshots`; their epochs are in the
            posterior's ``config["snapshot_epochs"]``): no extra training, three flows per density.
            ``"auto-snapshots"``: that mixture only where the flow fails ``"auto"``'s check, else the flow
            (the first fit decides; the check is in :attr:`auto_coverage`). One flow trains either way.
            ``"auto-stacked"`` (:data:`~sbiflows.ensemble.DEFAULT_ENSEMBLE`): as ``"auto-snapshots"``, but where
            the check passes, the snapshots weighted to maximize their mixture's density on the
            validation rows (:func:`~sbiflows.ensemble.stack`; members below 1% weight left out, sometimes all
            but the flow; the weights are in ``config["mixture_weights"]``).
        balancing: Weight of balanced NPE's penalty (Delaunoy et al. 2023; :mod:`sbiflows.balance`), which
            pushes credible regions towards conservative ones at some cost in sharpness and a second network
            pass per step; 0 (default): plain NPE, 100: the paper's choice.
        coverage_penalty: Weight of calibrated NPE's penalty on the coverage of the posterior's HPD regions
            (Falkiewicz et al. 2023; :mod:`sbiflows.coverage_loss`), which widens an over-confident
            posterior at the cost of 16 posterior draws for 64 rows of every training step; 0 (default):
            plain NPE. Saved with the posterior.
        space: Where the flow models theta: ``"unconstrained"`` (``u = T^{-1}(theta)``), ``"truncated"`` (theta
            restricted to the support; :mod:`sbiflows.truncated_space`) or ``"auto"`` (default): truncated for
            a box prior, unconstrained otherwise (the attribute ``space`` holds the resolved name).
        max_batch_elements: Rows per chunk in batched sampling/evaluation of the posterior (memory bound);
            None (default): the device's size (:func:`~sbiflows.posterior_batches.resolve_chunk_rows`).
        device: Where to train; default: the device of the prior's samples. A prior on another device is
            rebuilt on ``device`` (as :meth:`to` does; ``prior`` then holds the rebuilt one), so a CPU prior and
            CPU simulations train on ``"cuda"`` as they are.

    Attributes:
        net, theta, x: Read-only: the trained network and all training rows so far (None before a fit).
        history: The :class:`~sbiflows.training.TrainingHistory` of all successful fits (None before); for an
            ensemble, the first member's.
        histories: One history per ensemble member (None before a fit).
        auto_coverage: With ``ensemble="auto"``, ``"auto-snapshots"`` or ``"auto-stacked"`` (the default), the
            coverage check of the first fit's first flow (a :class:`~sbiflows.diagnostics.CoverageResult`;
            ``passed`` False: members were added, or snapshots mixed); else None.
        partial_posterior: The best posterior of the latest ``fit`` that raised after at least one epoch
            (e.g. Ctrl-C), the only place those weights are kept (the NPE is rolled back); None otherwise.
            For an ensemble, the mixture of the members with trained weights (finished ones, the
            interrupted one's best epoch, on a refit the others' previous weights).

    Example:
        >>> from torch.distributions import Independent, Uniform
        >>> prior = Independent(Uniform(-torch.ones(2), torch.ones(2)), 1)
        >>> theta = prior.sample((500,))
        >>> x = theta + 0.05 * torch.randn_like(theta)
        >>> posterior = NPE(prior).fit(theta, x, max_epochs=5, progress=False)
        >>> posterior.sample(1000, x=torch.zeros(2)).abs().max() < 1
        tensor(True)
    """

    def __init__(
        self,
        prior: Distribution,
        estimator: str | Callable[[int, int], Flow] = DEFAULT_ESTIMATOR,
        *,
        transforms: int | None = None,
        hidden_features: Sequence[int] = (50, 50),
        activation: str = "tanh",
        transformer: str | None = None,
        bins: int | None = None,
        bound: float | None = None,
        mixing: str = "none",
        embedding_net: nn.Module | str | None = "auto",
        ensemble: int | str = DEFAULT_ENSEMBLE,
        balancing: float = 0.0,
        coverage_penalty: float = 0.0,
        space: str = "auto",
        max_batch_elements: int | None = None,
        device: torch.device | str | None = None,
    ):
        self.ensemble = check_ensemble(ensemble)
        self.balancing = check_real(balancing, "balancing", low=0.0)
        self.coverage_penalty = check_real(coverage_penalty, "coverage_penalty", low=0.0)
        check_choice(space, "space", SPACE_OPTIONS)
        self._prior, self.theta_dim = check_prior(prior)
        prior_on = prior_device(self._prior)
        self.device = check_device(device) if device is not None else prior_on
        if prior_on != self.device:  # e.g. a CPU prior with device="cuda": rebuilt there (or a ValueError)
            prior = move_prior(prior, self.device)
            self._prior = check_prior(prior)[0]
        self.prior = prior
        self.space = resolve_space(self._prior.support, space)
        self._transformer, self.transforms, self.hidden_features = check_network_options(
            estimator, self.theta_dim, transformer=transformer, bins=bins, bound=bound, embedding_net=embedding_net,
            activation=activation, transforms=transforms, hidden_features=hidden_features, mixing=mixing,
        )
        self.estimator, self.mixing, self.activation, self.embedding_net = estimator, mixing, activation, embedding_net
        self.max_batch_elements = check_int(max_batch_elements, "max_batch_elements", minimum=1,
                                            optional="the device's size")
        self.dtype = torch.get_default_dtype()
        self.history: TrainingHistory | None = None
        self.histories: list[TrainingHistory] | None = None  # one per ensemble member
        self.auto_coverage: Any = None  # a CoverageResult (diagnostics import this module's posterior)
        self._auto_summary: dict | None = None  # what ensemble="auto" decided, as a restored posterior recorded it
        self.partial_posterior: Posterior | None = None
        self._seed = 0  # the seed that initialised the flow's weights (first fit)
        self._transforms: int | None = None  # the number of layers of the built flow (first fit)
        self._net: PosteriorNet | None = None
        self._theta: Tensor | None = None
        self._x: Tensor | None = None
        self._validation: list[Tensor] | None = None  # per member: which rows of _theta validate

    # ------------------------------------------------------------------ read-only state
    @property
    def net(self) -> PosteriorNet | None:
        """The network of the last successful ``fit`` (None before); the posterior holds a copy of it."""
        return self._net

    @property
    def theta(self) -> Tensor | None:
        """All training parameters so far (rows of every successful ``fit``, invalid rows dropped); None before."""
        return None if self._theta is None else self._theta.detach()

    @property
    def x(self) -> Tensor | None:
        """All training simulations so far, matching :attr:`theta`; None before the first ``fit``."""
        return None if self._x is None else self._x.detach()

    @property
    def validation(self) -> Tensor | None:
        """``(N,)`` boolean mask of the rows of :attr:`theta` that validate (the first ensemble member's);
        None before the first ``fit``."""
        return None if self._validation is None else self._validation[0].clone()

    @property
    def validations(self) -> Tensor | None:
        """``(K, N)`` boolean masks, one per ensemble member (each has its own split): the rows of
        :attr:`theta` that validate member ``k``; None before the first ``fit``."""
        return None if self._validation is None else torch.stack(self._validation)

    def to(self, device: torch.device | str) -> NPE:
        """Move the network, the stored training data and the prior to ``device``; returns ``self``.

        Raises:
            ValueError: If the prior cannot be rebuilt on ``device``; nothing is moved then.
        """
        device = check_device(device)
        prior = move_prior(self.prior, device)  # first: it may raise, and then nothing has moved
        self._prior = check_prior(prior)[0]
        self.prior, self.device = prior, torch.device(device)
        for name in ("_net", "_theta", "_x"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def fit(
        self,
        theta: Any,
        x: Any,
        *,
        seed: int = 0,
        max_epochs: int = MAX_EPOCHS,
        batch_size: int | None = None,
        learning_rate: float | None = None,
        validation_fraction: float = 0.1,
        patience: int = 20,
        clip_grad_norm: float = 5.0,
        weight_decay: float = 0.0,
        ema_epochs: float = 1.0,
        step_drops: int = 1,
        step_drop_factor: float = 0.2,
        drop_patience: int | None = 10,
        drop_batch_factor: float = 1.0,
        progress: bool = True,
        num_threads: int | None = None,
        checkpoint: str | os.PathLike | Checkpoint | None = None,
        compile: bool = False,  # noqa: A002 - torch.compile's name
        retrain_from_scratch: bool = False,
        on_nonfinite: str = "stop",
    ) -> Posterior:
        """Train on simulations and return the posterior.

        Args:
            theta: Parameters ``(N, D)`` drawn from the prior (``(N,)`` for ``D = 1``); tensor or numpy array.
            x: Simulations ``(N, x_dim)`` (``(N,)`` for ``x_dim = 1``) or ``(N, *x_shape)`` (structured),
                one per parameter set. Failed simulations (NaN or inf) are dropped with a warning; with a
                set embedding, all-NaN trials are padding, and only a set without a finite trial (or with
                inf, or NaN inside a trial) is failed.
            seed: Seeds the weight initialisation (without changing torch's global RNG state), the
                validation split and the minibatch order: same seed and data give the same posterior.
            max_epochs: Upper bound on epochs (``>= 1``).
            batch_size: Minibatch size (``>= 1``, at most the training rows left after the validation split:
                a larger one is a ValueError). None (default): ``2 * sqrt`` of the training rows within
                [32, 256] (:func:`~sbiflows.training.default_batch_size`).
            learning_rate: Adam step size (``> 0``). None (default): ``2e-3``
                (:func:`~sbiflows.training.default_learning_rate`). ``history`` records both values used.
            validation_fraction: Share of rows held out for early stopping, in ``(0, 1)``.
            patience: Epochs without validation improvement before stopping (``>= 1``; best weights
                restored). 20, as sbi's (docs/benchmarks.md, "Early-stopping patience with the spline default").
            clip_grad_norm: Maximum gradient norm (``> 0``).
            weight_decay: Adam's L2 penalty on the weights (``>= 0``; default 0, as sbi).
            ema_epochs: Validate and return an exponential moving average of Adam's iterates over about this
                many epochs (``>= 0``; ``0``: the raw iterates; :func:`sbiflows.training.train`).
            step_drops: Plateaus that restart from the best weights with the step times ``step_drop_factor``
                instead of ending training (``>= 0``; default 1, docs/benchmarks.md, "Step drops on a
                plateau"); ``history.step_drop_epochs`` records when.
            step_drop_factor: Factor of each drop, in ``(0, 1)``.
            drop_patience: Epochs a step drop gets to improve on the best validation loss (``>= 1``; then
                ``patience`` applies); None: ``patience``. Default 10 (docs/benchmarks.md, "A trial for the step drop").
            drop_batch_factor: Multiply the batch size by this at each step drop (``>= 1``; at most the training
                rows; :func:`~sbiflows.training.train`). Default 1: the batch size never changes. Flows of an
                ensemble with a factor above 1 train one after another (a vectorized pass shares one batch size).
            progress: Show a progress bar with the current losses.
            num_threads: torch intra-op threads during training (``>= 1``, restored afterwards). None
                (default): :mod:`sbiflows.threads` (one, unless you set torch's thread count yourself).
            checkpoint: A file (or a :class:`~sbiflows.checkpoint.Checkpoint`) where training saves its state
                every 60 s and when it ends (flows of an ensemble trained together after the first, in
                ``<stem>.members<suffix>`` beside it); the same fit made again resumes from it and ends as if
                never stopped (a file of any other fit is ignored and overwritten). With ``progress``, a path
                says on stderr when it resumes. Ctrl-C or SIGTERM ends the epoch and writes it first
                (:mod:`sbiflows.checkpoint`). Needs ``balancing=0`` and ``coverage_penalty=0``.
            compile: Run the training steps compiled with ``torch.compile`` (:mod:`sbiflows.compiling`): about
                a third of an eager step's time, after a compile of about 30 s the first time the machine sees
                this network and batch size (a few seconds afterwards, from inductor's cache on disk); worth it
                for long fits and repeated fits of one size. The weights differ from an eager fit's by float32
                rounding. If compiling fails, training warns and goes on eagerly.
            retrain_from_scratch: On a refit, train a new network (new weights from ``seed``, its depth and
                standardization from all rows so far, a new training history) instead of training on from
                the last fit's weights, as sbi's option of this name; earlier fits' validation rows stay
                validation rows. No effect on a first fit.
            on_nonfinite: What a non-finite training loss does once a finite validation loss was reached:
                ``"stop"`` (default) restores the best weights and stops with a warning (``history.diverged``);
                ``"restore_best"`` goes on from the best weights with half the step size the first time
                (``history.restart_epochs``; a warning) and stops at a second one
                (:func:`~sbiflows.training.train`). Per flow in an ensemble.

        Returns:
            A :class:`~sbiflows.posterior.Posterior` holding a copy of the trained weights.

        Raises:
            TypeError: For inputs that are not float tensors / arrays, or options of the wrong type.
            ValueError: For options out of range, no rows, mismatched rows, wrong shapes, NaN/inf in
                theta, theta outside the prior's support, no valid simulations, too few rows for
                the validation split, or a ``batch_size`` larger than the training rows.
            FloatingPointError: If the loss is non-finite before the first finite validation loss.

        Whatever is raised (also ``KeyboardInterrupt``), the object keeps the data, weights and history it
        had before the call; :attr:`partial_posterior` holds the failed attempt's weights.
        """
        max_epochs, checked_batch, patience = check_training_options(
            max_epochs=max_epochs, batch_size=batch_size, learning_rate=learning_rate,
            validation_fraction=validation_fraction, patience=patience, clip_grad_norm=clip_grad_norm,
            weight_decay=weight_decay, ema_epochs=ema_epochs, step_drops=step_drops, step_drop_factor=step_drop_factor,
            drop_patience=drop_patience, drop_batch_factor=drop_batch_factor, optional=("batch_size", "learning_rate"),
        )
        seed = check_int(seed, "seed")
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed must be in [-2**63, 2**64), the range torch.manual_seed takes, got {seed}")
        compile = check_bool(compile, "compile")  # noqa: A001
        progress = check_bool(progress, "progress")
        on_nonfinite = check_choice(on_nonfinite, "on_nonfinite", NONFINITE_CHOICES)
        fresh = check_bool(retrain_from_scratch, "retrain_from_scratch") or self._net is None
        checkpoint = as_checkpoint(checkpoint, objectives={"balancing": self.balancing,
                                                            "coverage_penalty": self.coverage_penalty},
                                   log=say_on_stderr if progress else None)
        resolve_threads(num_threads)  # checked before any expensive step
        with torch_threads(num_threads):
            theta, x = check_training_data(
                theta, x, prior=self._prior, theta_dim=self.theta_dim, dtype=self.dtype, device=self.device,
                earlier=None if self._theta is None else (self._theta, self._x),
                validation_fraction=validation_fraction,
                padded_trials=bool(getattr(EMBEDDINGS.get(self.embedding_net) if isinstance(self.embedding_net, str)
                                           else self.embedding_net, "nan_padded_trials", False)),
            )
            # Everything below works on new objects; self is only updated once training has succeeded.
            if self._theta is not None:
                theta, x = torch.cat([self._theta, theta]), torch.cat([self._x, x])
            n_train = split_sizes(len(theta), validation_fraction)[0]
            batch_size, learning_rate = batch_options(n_train, checked_batch, learning_rate)
            space = make_space(self._prior.support, self.space)
            inside = space.nudge_inside(theta)
            u = space.to_unconstrained(inside)
            objective = None if self.balancing == 0 else BalancedObjective(
                self._prior.log_prob(inside).to(u.dtype) + space.log_abs_det_jacobian(u), weight=self.balancing)
            if self.coverage_penalty > 0:
                objective = CalibratedObjective(objective or negative_log_likelihood, weight=self.coverage_penalty,
                                                seed=seed)
            if fresh:
                n_layers = default_transforms(n_train, self.theta_dim) if self.transforms is None else self.transforms
                count = {"auto": AUTO_MEMBERS, **dict.fromkeys(SNAPSHOT_CHOICES, 1)}.get(self.ensemble, self.ensemble)
                members = [build_network(u, x, seed=member_seed(seed, k), transforms=n_layers, device=self.device,
                                         dtype=self.dtype, embedding_net=self.embedding_net,
                                         **self._architecture()) for k in range(count)]
                flow_seed = seed
            else:
                flow_seed, n_layers = self._seed, self._transforms
                members = members_of(copy.deepcopy(self._net))
                if self.ensemble in SNAPSHOT_CHOICES:  # train on from the best weights (the last member)
                    members = members[-1:]
            # a new network's check decides the number of flows ("auto") or whether to mix ("auto-snapshots")
            auto = self.ensemble in ("auto", "auto-snapshots", "auto-stacked") and fresh
            histories = [TrainingHistory() for _ in members] if fresh else copy.deepcopy(self.histories)
            history = histories[0]
            epochs_before = [h.epochs for h in histories]
            groups = duplicate_groups(theta, x)
            earlier = self._validation
            if earlier is not None and len(earlier) < len(members):  # new flows of "auto" after it kept one
                earlier = earlier + earlier[:1] * (len(members) - len(earlier))
            masks, fixed = fit_validation(earlier, len(theta), validation_fraction, groups=groups,
                                          seeds=[member_seed(seed, k) for k in range(len(members))])
            # against the split that trains (a refit keeps earlier rows on their side; duplicates move the cut)
            check_batch_fits(checked_batch, n_train=min(int((~mask).sum()) for mask in masks), rows=len(theta),
                             validation_fraction=validation_fraction)
            trail = SnapshotTrail() if self.ensemble in SNAPSHOT_CHOICES else None
            if checkpoint is not None:  # what the network computes beyond its weights, in the checkpoint's key
                checkpoint.structure = repr({**self._architecture(), "space": self.space, "transforms": n_layers})
            options = dict(  # checked at the top of fit
                max_epochs=max_epochs, batch_size=batch_size, learning_rate=learning_rate,
                validation_fraction=validation_fraction, patience=patience, clip_grad_norm=clip_grad_norm,
                weight_decay=weight_decay, ema_epochs=ema_epochs, step_drops=step_drops,
                step_drop_factor=step_drop_factor, drop_patience=drop_patience, drop_batch_factor=drop_batch_factor,
                progress=progress,
                groups=groups, num_threads=num_threads, objective=objective, compile=compile,
                on_nonfinite=on_nonfinite)

            def check_first(flow: nn.Module) -> Any:  # on the flow's own validation rows (a copy: it trains on)
                posterior = Posterior(copy.deepcopy(flow), self.prior, config=self._config(flow, seed, n_layers),
                                      max_batch_elements=self.max_batch_elements)
                held_out = masks[0].to(theta.device)  # rows on a bound count as trained: nudged inside
                return auto_check(posterior, inside[held_out], x[held_out], seed=seed)

            try:
                check = train_flows(members, u, x, seed=seed, histories=histories, validations=fixed, trail=trail,
                                    check_first=check_first if auto else None, checkpoint=checkpoint, **options)
            except BaseException as error:
                # train_members() restored the best weights of the members it was training; members trained
                # before (this fit or, on a refit, the previous one) are complete, members never trained are not.
                trained = [k for k, h in enumerate(histories) if h.epochs > 0 and
                           (h.epochs > epochs_before[k] or not fresh)]
                if any(histories[k].epochs > epochs_before[k] for k in trained):
                    partial = mixture([members[k] for k in trained])
                    self.partial_posterior = partial_posterior(
                        partial, self.prior, self._config(partial, flow_seed, n_layers), histories[trained[0]],
                        error, of=len(members), max_batch_elements=self.max_batch_elements)
                raise
            if check is not None and check.passed:  # one flow is enough: drop the members not trained
                members, histories, masks = members[:1], histories[:1], masks[:1]
            snapshot_epochs, weights = None, None
            if trail is not None and (self.ensemble == "snapshots" or self._over_confident(check)):
                members, snapshot_epochs = trail.networks(members[0], history.best_epoch, start=epochs_before[0])
            elif trail is not None and self.ensemble == "auto-stacked":  # on the rows that chose the best epoch
                held_out = masks[0].to(theta.device)
                members, snapshot_epochs, weights = self._stacked(trail, members[0], history.best_epoch,
                                                                  start=epochs_before[0], theta=inside[held_out],
                                                                  x=x[held_out], seed=seed, transforms=n_layers)
            net = mixture(members, weights)
            self._net, self._theta, self._x, self.history, self._seed = net, theta, x, history, flow_seed
            self.histories, self._validation = histories, masks
            self.auto_coverage = check if auto else self.auto_coverage
            self._transforms, self.partial_posterior = n_layers, None
            config = self._config(net, flow_seed, n_layers, snapshot_epochs)
            return Posterior(copy.deepcopy(net), self.prior, config=config, history=copy.deepcopy(history),
                             max_batch_elements=self.max_batch_elements)

    def restore(
        self, posterior: Posterior, theta: Any, x: Any, *, validation: Any = None,
        histories: list[TrainingHistory] | None = None,
    ) -> NPE:
        """Continue from an earlier fit: adopt ``posterior``'s weights and history and the rows it was trained on.

        After ``restore``, ``fit`` appends to ``theta``/``x`` and trains on from ``posterior``'s weights,
        as if the fits that made ``posterior`` had run on this object (how :class:`~sbiflows.TSNPE`
        resumes a killed run from its saved rounds). Nothing is checked against the original training
        run beyond shapes: pass the valid rows that fit saw, in order.

        Args:
            posterior: A posterior returned by ``fit`` of an NPE with this prior and these options (or
                loaded from its file), a single flow or an ensemble of ``K`` flows.
            theta: Its training parameters ``(N, D)``.
            x: Its training simulations ``(N, x_dim)``, all finite.
            validation: The rows that validated, so later fits keep them on the validation side:
                ``(N,)`` booleans for a single flow (:attr:`validation` after that fit), ``(K, N)`` for an
                ensemble (:attr:`validations`). None: a seeded random split of 10% of the rows per member
                (some of which may have trained the posterior: only the given split keeps the guarantee
                that refits never validate on rows trained on before).
            histories: An ensemble's ``K`` training histories (:attr:`histories` after that fit), so that
                later fits continue each one. None: the posterior's history for the first member, and
                empty ones for the others (a saved posterior keeps only the first member's).

        Returns:
            ``self``.

        Raises:
            ValueError: For a posterior of another shape, space or network options (a callable estimator's
                flow excepted) than this NPE's, more flows than its ``ensemble`` allows (``"auto"`` takes one or
                three, the snapshot choices one to three), or rows, splits or histories that do not fit it.
        """
        state = restored_state(self, posterior, theta, x, validation=validation, histories=histories)
        self._net, self._theta, self._x, self._validation = state.net, state.theta, state.x, state.masks
        self.histories, self.history = state.histories, state.histories[0]
        self._seed, self._transforms = state.flow_seed, state.transforms
        self.auto_coverage, self._auto_summary = None, state.auto_summary
        self.partial_posterior = None
        return self

    # ------------------------------------------------------------------------------ internals
    def _stacked(self, trail: SnapshotTrail, net: nn.Module, best_epoch: int, *, start: int, theta: Tensor,
                 x: Tensor, seed: int, transforms: int) -> tuple[list[nn.Module], list[int] | None, Tensor | None]:
        """``ensemble="auto-stacked"`` where the check passed: :meth:`SnapshotTrail.stacked` on the validation rows
        ``(theta, x)``, with epochs and weights None where the flow alone is left."""
        nets, epochs, weights = trail.stacked(net, best_epoch, self.prior, self._config(net, seed, transforms), theta,
                                              x, start=start)
        if nets == [net]:  # the flow alone
            return nets, None, None
        return nets, epochs, weights

    def _over_confident(self, check: Any) -> bool:
        """Whether the auto check failed: this fit's ``check``, else the first fit's (kept or restored)."""
        if check is not None:
            return not check.passed
        if self.auto_coverage is not None:
            return not self.auto_coverage.passed
        return bool(self._auto_summary and self._auto_summary.get("over_confident"))

    def _architecture(self) -> dict[str, Any]:
        """The options (checked by ``__init__``) that :func:`build_network` and :func:`network_config` share."""
        return {"estimator": self.estimator, "theta_dim": self.theta_dim, "hidden_features": self.hidden_features,
                "activation": self.activation, "transformer": self._transformer}

    def _config(self, net: PosteriorNet | EnsembleNet, flow_seed: int, transforms: int,
                snapshot_epochs: list[int] | None = None) -> dict:
        summary = self._auto_summary if self.auto_coverage is None else auto_summary(self.auto_coverage)
        auto = {} if summary is None else {"ensemble_auto": summary}
        if snapshot_epochs is not None:
            auto["snapshot_epochs"] = list(snapshot_epochs)
        return auto | network_config(net, flow_seed=flow_seed, transforms=transforms, balancing=self.balancing,
                                     coverage_penalty=self.coverage_penalty, space=self.space,
                                     **self._architecture())


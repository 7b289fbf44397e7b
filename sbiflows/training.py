"""Maximum-likelihood training of any module with ``log_prob(inputs, context)``.

The loss is the lecture's negative log-likelihood: ``-log p(x) = -(log p_Z(f^{-1}(x)) + sum_k logdet_k)``,
averaged over a minibatch. Training uses Adam, a validation split, early stopping that restores the best
weights, gradient-norm clipping and an optional progress bar.

What is validated, kept and returned is an exponential moving average (EMA) of the weights over about
``ema_epochs`` epochs, not the last Adam iterate. The average removes most of the minibatch noise of
the iterates, so a larger step size stays accurate (docs/benchmarks.md, "Weight averaging"); the
average is a :class:`~sbiflows.weight_average.WeightAverage`. The options' checks and defaults live in
:mod:`sbiflows.training_options`; both are importable from here too. While it trains, the model's
parameters are views of flat buffers (:mod:`sbiflows.flat_parameters`), so that the optimizer and the
clipping act on one tensor.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sbiflows.checkpoint import Checkpoint, call_key, deferred_stops, loop_state, restore_loop
from sbiflows.checks import check_bool, check_choice
from sbiflows.compiling import compiled_objective
from sbiflows.divergence import (
    NONFINITE_CHOICES, RESTART_FACTOR, may_restart, nonfinite_key, record_divergence, record_restart,
)
from sbiflows.early_stopping import Plateau
from sbiflows.flat_parameters import FlatParameters, PerParameterState
from sbiflows.snapshots import SnapshotTrail
from sbiflows.threads import resolve_threads, torch_threads
from sbiflows.training_options import (
    MAX_EPOCHS,
    batch_after_drops,
    check_training_options,
    default_batch_size,  # noqa: F401 - public here
    default_learning_rate,  # noqa: F401 - public here
    split_sizes,  # noqa: F401 - public here
    training_split,
)
from sbiflows.weight_average import WeightAverage

#: A training loss: ``objective(model, inputs, context, rows)`` is the mean loss of the rows ``rows`` (a
#: 1-D index tensor) as a scalar tensor; :func:`negative_log_likelihood` is the default.
Objective = Callable[[nn.Module, Tensor, "Tensor | None", Tensor], Tensor]


def negative_log_likelihood(model: nn.Module, inputs: Tensor, context: Tensor | None, rows: Tensor) -> Tensor:
    """The mean negative log-likelihood ``-mean log p(inputs[rows] | context[rows])``: the default objective.

    Example:
        >>> from sbiflows.flows import maf
        >>> flow = maf(2, transforms=1, hidden_features=(8,))
        >>> negative_log_likelihood(flow, torch.zeros(3, 2), None, torch.arange(3)).shape
        torch.Size([])
    """
    return -model.log_prob(inputs[rows], None if context is None else context[rows]).mean()


@dataclass
class TrainingHistory:
    """What happened during training (losses are the objective's mean per row: the negative log-likelihood
    unless another objective was given).

    A history passed to :func:`train` again (e.g. by a second :meth:`sbiflows.NPE.fit`) is extended:
    epochs are numbered over all calls, so ``validation_loss[best_epoch] == best_validation_loss``.

    Attributes:
        train_loss: Training loss per epoch, over all calls.
        validation_loss: Validation loss per epoch, over all calls.
        best_epoch: Epoch (0-based, counted from the first call) whose weights were restored at the
            end of the last call; -1 before any completed epoch. Only epochs of the last call compete
            (an earlier call may have used another validation split).
        best_validation_loss: Validation loss of the restored weights.
        epochs: Number of epochs run, over all calls.
        stopped_early: Whether early stopping ended the last call.
        diverged: Whether the last call stopped on a non-finite loss (best weights restored).
        seconds: Wall time of training, over all calls.
        batch_size: Minibatch size of the last call (after lowering it to the training rows); 0 in
            histories saved before this field existed.
        learning_rate: Adam step size of the last call; 0.0 in histories saved before this field existed.
        ema_epochs: Length of the weight average of the last call, in epochs (0.0: no average; also
            in histories saved before this field existed).
        step_drop_epochs: Epochs of the last call after which a plateau lowered the step size
            (``step_drops``); empty in histories saved before this field existed.
        restart_epochs: Epochs of the last call whose non-finite loss restarted training from the best
            weights with half the step size (``on_nonfinite="restore_best"``); empty in histories saved
            before this field existed.
    """

    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    best_validation_loss: float = math.inf
    epochs: int = 0
    stopped_early: bool = False
    diverged: bool = False
    seconds: float = 0.0
    batch_size: int = 0
    learning_rate: float = 0.0
    ema_epochs: float = 0.0
    step_drop_epochs: list[int] = field(default_factory=list)
    restart_epochs: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        """A JSON-serialisable dictionary."""
        return dict(self.__dict__)


def train(
    model: nn.Module,
    inputs: Tensor,
    context: Tensor | None = None,
    *,
    max_epochs: int = MAX_EPOCHS,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    validation_fraction: float = 0.1,
    patience: int = 20,
    clip_grad_norm: float = 5.0,
    weight_decay: float = 0.0,
    ema_epochs: float = 1.0,
    step_drops: int = 0,
    step_drop_factor: float = 0.2,
    drop_patience: int | None = None,
    drop_batch_factor: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    history: TrainingHistory | None = None,
    groups: Tensor | None = None,
    validation: Tensor | None = None,
    num_threads: int | None = None,
    objective: Objective | None = None,
    snapshots: SnapshotTrail | None = None,
    checkpoint: Checkpoint | None = None,
    compile: bool = False,  # noqa: A002 - torch.compile's name, as Lightning and Keras use it
    on_nonfinite: str = "stop",
) -> TrainingHistory:
    """Fit ``model`` by maximum likelihood on ``inputs`` (rows), optionally conditioned on ``context``.

    Args:
        model: A module with ``log_prob(inputs, context) -> (N,)`` (e.g. a :class:`~sbiflows.flows.Flow`).
        inputs: ``(N, D)`` training data.
        context: ``(N, C)`` conditioning variables, one row per input row, or None.
        max_epochs: Upper bound on passes over the training split (``>= 1``).
        batch_size: Minibatch size (``>= 1``); a value larger than the number of training rows is
            lowered to that number (one full batch per epoch). :meth:`sbiflows.NPE.fit` refuses one instead.
        learning_rate: Adam step size (``> 0``).
        validation_fraction: Share of rows held out for early stopping, in ``(0, 1)``.
        patience: Epochs without validation improvement before stopping (``>= 1``).
        clip_grad_norm: Maximum gradient norm (``> 0``; ``inf`` disables clipping).
        weight_decay: Adam weight decay (``>= 0``).
        ema_epochs: Validate, keep and return an exponential moving average of the weights with a
            time constant of this many epochs (``>= 0``; ``0`` uses the raw Adam iterates). Its
            first steps average over a shorter, growing window, so early epochs are not dominated
            by the initial weights. ``train_loss`` is the loss of the raw iterates.
        step_drops: How often a plateau lowers the step size instead of ending training (``>= 0``):
            after ``patience`` epochs without improvement, while drops are left, training restarts
            from the best weights with the step size times ``step_drop_factor`` and counts patience
            afresh; the plateau after the last drop stops training. ``0``: the first plateau stops.
        step_drop_factor: Factor of each drop, in ``(0, 1)``.
        drop_patience: Epochs a step drop gets to improve on the best validation loss (``>= 1``): if
            none of the first ``drop_patience`` epochs after a drop does, training stops (or the next
            drop comes) there; once one does, ``patience`` applies as before. None: ``patience``. A
            shorter value saves the epochs after a drop that finds nothing better, without cutting
            short a drop that does.
        drop_batch_factor: Multiply the minibatch size by this at each step drop (``>= 1``, rounded, at most
            the training rows; the weight average keeps its time constant in epochs): a drop then also takes
            fewer, larger steps, which lowers the gradient noise as a smaller step does, in less time per epoch.
            ``1``: the batch size never changes.
        seed: Seeds the split and the minibatch order (the model's initial weights are the caller's).
        progress: Show a progress bar with the current losses.
        history: Continue this history (e.g. when training again with more data): losses are
            appended, epochs keep counting from its ``epochs``, and the per-call fields
            (``stopped_early``, ``diverged``) are reset. The object is updated in place.
        groups: ``(N,)`` integer labels of rows that must stay on one side of the validation split
            (e.g. duplicated simulations, which would otherwise be scored on copies of training rows);
            None splits rows freely.
        validation: ``(N,)`` boolean mask of the rows to validate on (True) instead of a random split of
            ``validation_fraction`` (then ``groups`` is not used: the mask must keep copies together); e.g.
            a held-out set that stays fixed when refitting on more rows
            (:func:`~sbiflows.training_options.extend_validation_mask`). Both sides must be non-empty.
        num_threads: torch intra-op threads while training (restored afterwards); None: the rule of
            :mod:`sbiflows.threads` (one thread unless you set torch's thread count yourself).
        objective: The loss minimized and validated (an :data:`Objective`); None: the mean negative
            log-likelihood (:func:`negative_log_likelihood`). ``NPE(balancing=...)`` passes a
            :class:`~sbiflows.balance.BalancedObjective`.
        snapshots: Keep the weights of every validation improvement of this call in this trail
            (:mod:`sbiflows.snapshots`; ``NPE(ensemble="snapshots")`` mixes some of them); None: only the best.
        checkpoint: Save the loop's state there while training, and resume from it if it holds this very
            call's state (:mod:`sbiflows.checkpoint`); needs the default ``objective``. None: no checkpoint.
        compile: Run the training steps compiled with ``torch.compile`` (:mod:`sbiflows.compiling`): about a
            third of an eager step's time, after a compile of about 30 s the first time this machine sees the
            network and batch size (seconds afterwards); worth it for long fits and repeated fits of one size.
            If compiling fails, training warns and goes on eagerly.
        on_nonfinite: What a non-finite loss does (after a finite validation loss was reached): ``"stop"``
            (default) restores the best weights and stops with a warning; ``"restore_best"`` the first
            time goes on from the best weights with half the step size and a restarted weight average
            (a warning; ``history.restart_epochs`` records the epoch, whose losses are NaN), and stops
            as ``"stop"`` does at a second one.

    Returns:
        The :class:`TrainingHistory`; the model holds the weights of the best validation epoch of
        this call (also after an exception such as ``KeyboardInterrupt``).

    Raises:
        TypeError: For options of the wrong type (e.g. a float ``batch_size``).
        ValueError: For options out of range, mismatched rows or a split that leaves too few rows.
        FloatingPointError: If the loss is non-finite before any finite validation loss was reached
            (otherwise a non-finite loss stops training with a warning and restores the best weights).

    Example:
        >>> from sbiflows.flows import maf
        >>> flow = maf(2, transforms=1, hidden_features=(8, 8))
        >>> hist = train(flow, torch.randn(200, 2), max_epochs=2, batch_size=50)
        >>> hist.epochs, hist.ema_epochs
        (2, 1.0)
    """
    max_epochs, batch_size, patience = check_training_options(
        max_epochs=max_epochs, batch_size=batch_size, learning_rate=learning_rate,
        validation_fraction=validation_fraction, patience=patience, clip_grad_norm=clip_grad_norm,
        weight_decay=weight_decay, ema_epochs=ema_epochs, step_drops=step_drops, step_drop_factor=step_drop_factor,
        drop_patience=drop_patience, drop_batch_factor=drop_batch_factor,
    )
    compile = check_bool(compile, "compile")  # noqa: A001
    on_nonfinite = check_choice(on_nonfinite, "on_nonfinite", NONFINITE_CHOICES)
    return train_checked(
        model, inputs, context, max_epochs=max_epochs, batch_size=batch_size, learning_rate=learning_rate,
        validation_fraction=validation_fraction, patience=patience, clip_grad_norm=clip_grad_norm,
        weight_decay=weight_decay, ema_epochs=ema_epochs, step_drops=step_drops, step_drop_factor=step_drop_factor,
        drop_patience=drop_patience, drop_batch_factor=drop_batch_factor, seed=seed, progress=progress,
        history=history, groups=groups, validation=validation, num_threads=num_threads,
        objective=objective, snapshots=snapshots, checkpoint=checkpoint, compile=compile, on_nonfinite=on_nonfinite,
    )


def train_checked(
    model: nn.Module,
    inputs: Tensor,
    context: Tensor | None = None,
    *,
    max_epochs: int = MAX_EPOCHS,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    validation_fraction: float = 0.1,
    patience: int = 20,
    clip_grad_norm: float = 5.0,
    weight_decay: float = 0.0,
    ema_epochs: float = 1.0,
    step_drops: int = 0,
    step_drop_factor: float = 0.2,
    drop_patience: int | None = None,
    drop_batch_factor: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    history: TrainingHistory | None = None,
    groups: Tensor | None = None,
    validation: Tensor | None = None,
    num_threads: int | None = None,
    objective: Objective | None = None,
    snapshots: SnapshotTrail | None = None,
    checkpoint: Checkpoint | None = None,
    compile: bool = False,  # noqa: A002
    on_nonfinite: str = "stop",
) -> TrainingHistory:
    """:func:`train` for options already checked with :func:`check_training_options` (``NPE.fit`` does,
    before its own data checks), so one call validates them once."""
    resolve_threads(num_threads)
    if checkpoint is not None and objective is not None:
        raise ValueError(f"checkpoint needs the default objective (the negative log-likelihood), whose state is "
                         f"all in the checkpoint; got objective={objective!r:.60}")
    objective = negative_log_likelihood if objective is None else objective
    n = _check_rows(inputs, context)
    generator, train_idx, val_idx = training_split(n, validation_fraction, seed=seed, groups=groups,
                                                   validation=validation, device=inputs.device)
    n_train = len(train_idx)
    batch_size = min(batch_size, n_train)

    history = TrainingHistory() if history is None else history
    history.stopped_early, history.diverged = False, False
    history.batch_size, history.learning_rate = batch_size, float(learning_rate)
    history.ema_epochs = float(ema_epochs)
    first = history.epochs  # global number of this call's first epoch
    flat = FlatParameters([p for p in model.parameters() if p.requires_grad])
    try:  # a failure before the loop's own try leaves the parameters as they were
        optimizer = _adam(flat.flat, learning_rate=learning_rate, weight_decay=weight_decay)
        per_parameter = PerParameterState(flat, optimizer)  # what checkpoints hold
        steps_per_epoch = math.ceil(n_train / batch_size)
        average = WeightAverage(model, steps=ema_epochs * steps_per_epoch) if ema_epochs > 0 else None
        validated = model if average is None else average.module  # the weights that are scored and kept
        best_state = _snapshot(model)
        rule = Plateau(patience=patience, step_drops=step_drops, drop_patience=drop_patience)
        history.step_drop_epochs, history.restart_epochs = [], []
        key, resume_at, finished = None, first, False
        if checkpoint is not None:
            weights = {f"model/{name}": value for name, value in model.state_dict().items()}
            key = call_key({**weights, "inputs": inputs, "context": context, "train": train_idx, "validation": val_idx,
                            "generator": generator.get_state()},
                           {"max_epochs": max_epochs, "batch_size": batch_size, "learning_rate": float(learning_rate),
                            "patience": patience, "clip_grad_norm": float(clip_grad_norm),
                            "weight_decay": float(weight_decay), "ema_epochs": float(ema_epochs),
                            "step_drops": step_drops, "step_drop_factor": float(step_drop_factor),
                            "drop_patience": drop_patience, "seed": seed, "snapshots": snapshots is not None,
                            **({} if drop_batch_factor == 1 else {"drop_batch_factor": float(drop_batch_factor)}),
                            "structure": checkpoint.structure, "model": repr(model), "compile": compile,
                            **nonfinite_key(on_nonfinite)},
                           [history.as_dict()])
            checkpoint.start()
            saved = checkpoint.load(key, inputs.device)
            if saved is not None:
                resume_at, best_state, finished = restore_loop(
                    saved, model=model, optimizer=per_parameter, average=average, rule=rule, history=history,
                    generator=generator, snapshots=snapshots)
                flat.reattach()  # loading may have swapped the parameters' storage
                checkpoint.resumed(resume_at, finished)
        first_batch = batch_size

        def rebatch(previous: object = None) -> tuple[int, Callable[..., Tensor]]:  # the batch after the drops so far
            size = batch_after_drops(first_batch, len(history.step_drop_epochs), factor=drop_batch_factor,
                                     rows=n_train)
            if average is not None and size != first_batch:
                average.retime(ema_epochs * math.ceil(n_train / size))
            failed = getattr(previous, "failed", None) is not None  # a compile that failed is not tried again
            return size, compiled_objective(objective, batch_size=size, enabled=compile and not failed)

        batch_size, step_loss = rebatch()
        state = functools.partial(loop_state, model=model, optimizer=per_parameter, average=average, rule=rule,
                                  history=history, generator=generator, snapshots=snapshots)
    except BaseException:
        flat.release()
        raise
    with deferred_stops(checkpoint):  # Ctrl-C / SIGTERM: the epoch ends, its checkpoint is written
        bar = None
        with torch_threads(num_threads):
            start = time.perf_counter()
            try:
                bar = _progress_bar(max_epochs) if progress else None
                if bar is not None and not finished:
                    bar.update(resume_at - first)  # the epochs of a stopped call that this one resumes
                for epoch in range(resume_at, first + max_epochs) if not finished else ():
                    model.train()
                    order = train_idx[torch.randperm(n_train, generator=generator).to(inputs.device)]
                    total, diverged = 0.0, False
                    for batch in order.split(batch_size):
                        loss = step_loss(model, inputs, context, batch)
                        value = loss.item()
                        if not math.isfinite(value):
                            diverged = True
                            break
                        flat.zero_grad()  # in place: None would detach the parameters' gradient views
                        loss.backward()
                        flat.clip_grad_norm_(clip_grad_norm)
                        optimizer.step()
                        if average is not None:
                            average.update()
                        total += value * len(batch)
                    if average is not None:
                        average.copy_buffers()
                    val_loss = math.nan if diverged else _evaluate(validated, inputs, context, val_idx, objective)
                    if diverged or not math.isfinite(val_loss):
                        if not may_restart(on_nonfinite, rule, history):
                            record_divergence(history, rule, epoch, stacklevel=2)
                            break
                        record_restart(history, rule, epoch, stacklevel=2)
                        action, factor = "restart", RESTART_FACTOR
                    else:
                        history.train_loss.append(total / n_train)
                        history.validation_loss.append(val_loss)
                        history.epochs += 1
                        improved, action = rule.observe(val_loss, epoch)
                        if improved:
                            best_state = _snapshot(validated)
                            if snapshots is not None:
                                snapshots.add(epoch, best_state)  # the copy itself: loading it never changes it
                        if bar is not None:
                            bar.set_postfix(train=f"{total / n_train:.3f}", val=f"{val_loss:.3f}",
                                            best=f"{rule.best_loss:.3f}")
                            bar.update(1)
                        if action == "drop":
                            history.step_drop_epochs.append(epoch)
                        elif action == "stop":
                            history.stopped_early = True
                            break
                        factor = step_drop_factor
                    if action in ("drop", "restart"):  # a plateau or a restart: go on from the best weights
                        model.load_state_dict(best_state)
                        flat.reattach()  # loading may have swapped the parameters' storage
                        if average is not None:
                            average.restart()
                        for group in optimizer.param_groups:
                            group["lr"] *= factor
                        if action == "drop" and drop_batch_factor != 1:
                            batch_size, step_loss = rebatch(step_loss)
                    if checkpoint is not None:
                        checkpoint.epoch_end(lambda: state(key=key, epoch=epoch + 1, finished=False,
                                                           best_state=best_state,
                                                           running=time.perf_counter() - start))
            finally:
                if bar is not None:
                    bar.close()
                flat.release()
                model.load_state_dict(best_state)
                model.eval()
                if rule.best_epoch >= 0:  # otherwise the model keeps its initial weights, which the old fields describe
                    history.best_epoch, history.best_validation_loss = rule.best_epoch, rule.best_loss
                history.seconds += time.perf_counter() - start
        if checkpoint is not None and not finished:  # training ended: the next identical call returns at once
            checkpoint.save(state(key=key, epoch=history.epochs, finished=True, best_state=best_state))
    return history


def _adam(params: list[nn.Parameter], *, learning_rate: float, weight_decay: float) -> torch.optim.Adam:
    """Adam with its fused kernel where torch has one for the parameters' device and dtype.

    A flow has many small parameter tensors, so the per-tensor overhead of the update matters: a whole
    training step of the default NPE is 12-22% faster with the fused kernel than with ``foreach``
    (``examples/benchmark_training_step.py``, docs/benchmarks.md). Devices or dtypes without the
    fused kernel fall back to ``foreach``; both compute the same Adam update.
    """
    try:
        return torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device / dtype / torch version
        return torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay, foreach=True)


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's state dict (cheaper than ``copy.deepcopy``, taken at every improvement)."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _check_rows(inputs: Tensor, context: Tensor | None) -> int:
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.ndim != 2:
        raise ValueError(f"inputs must have shape (N, D), got {tuple(inputs.shape)}")
    if context is not None:
        if not isinstance(context, Tensor):
            raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
        if context.ndim < 2 or len(context) != len(inputs):  # (N, C), or structured x (N, *x_shape) for NPE
            raise ValueError(
                f"context must have shape ({len(inputs)}, C) to match inputs, got {tuple(context.shape)}"
            )
    return len(inputs)


@torch.no_grad()
def _evaluate(model: nn.Module, inputs: Tensor, context: Tensor | None, idx: Tensor,
              objective: Objective = negative_log_likelihood, chunk: int = 8192) -> float:
    model.eval()
    total = 0.0
    for part in idx.split(chunk):
        total += objective(model, inputs, context, part).item() * len(part)
    return total / len(idx)


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="training", unit="epoch", leave=False, disable=None)  # silent off a terminal

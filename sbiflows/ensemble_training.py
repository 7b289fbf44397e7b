"""Train an ensemble's members together: one vectorized forward and backward pass per minibatch.

The members of an ensemble (:mod:`sbiflows.ensemble`) share their architecture, so their weights
stack into one tensor per parameter (:func:`torch.func.stack_module_state`) and one
:func:`torch.func.vmap` of the negative log-likelihood computes every member's loss on its own
minibatch. A training step of a small flow is dominated by per-operation overhead, so members that
step together cost far less than members that step one after another (docs/benchmarks.md,
"Ensembles trained in one vectorized pass").

Each member trains as :func:`~sbiflows.training.train` trains it alone with its seed: its own
validation split and minibatch order, gradient-norm clipping of its own gradients, its own Adam step
size (step drops) and weight average, its own early stopping (:class:`~sbiflows.early_stopping.Plateau`)
and best weights, which it keeps. A member that stops leaves the stack, so the others step without it.
The results equal sequential training up to floating-point rounding (tested).

Where the members cannot be vectorized they train one after another with
:func:`~sbiflows.training.train_checked`: a custom objective (balancing, the coverage penalty), splits
of different sizes (duplicate groups) or a network :func:`torch.func.vmap` refuses (e.g. batch norm).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from sbiflows.checkpoint import Checkpoint, call_key, deferred_stops, with_seconds
from sbiflows.compiling import compiled_objective
from sbiflows.divergence import (
    RESTART_FACTOR, may_restart, nonfinite_key, record_divergence, record_restart,
)
from sbiflows.early_stopping import Plateau
from sbiflows.threads import torch_threads
from sbiflows.training import MAX_EPOCHS, Objective, TrainingHistory, _adam, _check_rows, _progress_bar, train_checked
from sbiflows.training_options import training_split

__all__ = ["train_members"]

_EVAL_CHUNK = 8192  # validation rows per vectorized pass


class _LogProb(nn.Module):
    """``forward(inputs, context) = net.log_prob(inputs, context)``, the call :func:`functional_call` makes."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, inputs: Tensor, context: Tensor | None) -> Tensor:
        return self.net.log_prob(inputs, context)


def train_members(
    members: Sequence[nn.Module],
    inputs: Tensor,
    context: Tensor | None,
    *,
    seeds: Sequence[int],
    histories: Sequence[TrainingHistory],
    validations: Sequence[Tensor | None],
    groups: Tensor | None = None,
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
    objective: Objective | None = None,
    progress: bool = False,
    num_threads: int | None = None,
    checkpoint: Checkpoint | None = None,
    compile: bool = False,  # noqa: A002 - torch.compile's name
    on_nonfinite: str = "stop",
) -> str:
    """Train ``members`` (same architecture) on the same rows, member ``k`` with ``seeds[k]``, in place.

    The options are :func:`~sbiflows.training.train`'s, already checked (``NPE.fit`` checks them once);
    ``histories[k]`` is extended as train extends a history and ``validations[k]`` is member ``k``'s
    split (None: drawn from its seed). Every member ends with its best weights, also after an
    exception (members not reached by sequential training keep their initial weights). Trained
    together, each member's ``seconds`` counts the whole joint training.

    ``checkpoint`` (:mod:`sbiflows.checkpoint`): where the training keeps its state and resumes from: the
    vectorized pass's, one member's as :func:`~sbiflows.training.train` keeps it, or with several members
    trained one after another each member ``k``'s in ``checkpoint.sibling(f"member{k}")``.

    Returns:
        ``"vectorized"`` or ``"sequential"``: how the members were trained.

    Raises:
        FloatingPointError: If a member's loss is non-finite before it reached any finite validation
            loss (the other members keep their best weights so far).

    Example:
        >>> from sbiflows.flows import maf
        >>> members = [maf(2, 1, transforms=1, hidden_features=(8,), seed=k) for k in range(2)]
        >>> histories = [TrainingHistory(), TrainingHistory()]
        >>> train_members(members, torch.randn(100, 2), torch.randn(100, 1), seeds=[0, 1], histories=histories,
        ...               validations=[None, None], max_epochs=2, batch_size=20)
        'vectorized'
        >>> [h.epochs for h in histories]
        [2, 2]
    """
    options = dict(max_epochs=max_epochs, batch_size=batch_size, learning_rate=learning_rate,
                   validation_fraction=validation_fraction, patience=patience, clip_grad_norm=clip_grad_norm,
                   weight_decay=weight_decay, ema_epochs=ema_epochs, step_drops=step_drops,
                   step_drop_factor=step_drop_factor, drop_patience=drop_patience, compile=compile,
                   on_nonfinite=on_nonfinite)
    growing = {} if drop_batch_factor == 1 else {"drop_batch_factor": drop_batch_factor}
    n = _check_rows(inputs, context)
    splits = [training_split(n, validation_fraction, seed=seed, groups=groups, validation=mask,
                             device=inputs.device) for seed, mask in zip(seeds, validations)]
    stack = None
    # one batch size for all: members whose batch grows at their own drops train one after another
    if len(members) > 1 and objective is None and len({len(s[1]) for s in splits}) == 1 and not growing:
        stack = _stack_if_vectorized(members, inputs, context)
    if stack is not None:
        _train_stacked(stack, members, inputs, context, splits=splits, histories=histories, progress=progress,
                       num_threads=num_threads, checkpoint=checkpoint, **options)
        return "vectorized"
    for k, (member, seed, history, mask) in enumerate(zip(members, seeds, histories, validations)):
        own = checkpoint if checkpoint is None or len(members) == 1 else checkpoint.sibling(f"member{k}")
        train_checked(member, inputs, context, seed=seed, history=history, validation=mask, groups=groups,
                      objective=objective, progress=progress, num_threads=num_threads, checkpoint=own, **options,
                      **growing)
    return "sequential"


def _stack_if_vectorized(members: Sequence[nn.Module], inputs: Tensor, context: Tensor | None) -> _Stack | None:
    """The members' :class:`_Stack` if one vmapped forward and backward pass over it runs on two rows, else None."""
    if any(type(m) is not type(members[0]) for m in members):
        return None
    try:
        stack = _Stack(members)
        rows = torch.arange(min(2, len(inputs)), device=inputs.device).expand(len(members), -1)
        stack.losses(inputs, context, rows).sum().backward()  # the gradients are cleared before each step
    except Exception:  # noqa: BLE001 - any op without a batching rule, in-place buffer update, shape change...
        return None
    return stack


class _Stack:
    """The stacked weights and buffers of the members still training, and the vmapped loss over them.

    ``active[i]`` is the member index of slot ``i`` of every stacked tensor.
    """

    def __init__(self, members: Sequence[nn.Module]):
        wrapped = [_LogProb(m) for m in members]
        params, buffers = stack_module_state(wrapped)
        trainable = {name for name, p in wrapped[0].named_parameters() if p.requires_grad}
        self.params = {name: p for name, p in params.items() if name in trainable}
        self.fixed = {**{name: p.detach() for name, p in params.items() if name not in trainable}, **buffers}
        self.base = copy.deepcopy(wrapped[0]).to("meta")
        self.active = list(range(len(members)))

    def _loss(self, params: dict, fixed: dict, inputs: Tensor, context: Tensor | None) -> Tensor:
        return -functional_call(self.base, ({**params, **fixed},), (inputs, context)).mean()

    def losses(self, inputs: Tensor, context: Tensor | None, rows: Tensor, params: dict | None = None) -> Tensor:
        """``(A,)`` mean negative log-likelihoods, slot ``i`` on rows ``rows[i]`` (``rows``: ``(A, b)``)."""
        params = self.params if params is None else params
        if context is None:
            return vmap(lambda p, f, u: self._loss(p, f, u, None))(params, self.fixed, inputs[rows])
        return vmap(self._loss)(params, self.fixed, inputs[rows], context[rows])

    def member_state(self, slot: int, params: dict) -> dict[str, Tensor]:
        """Slot ``slot``'s state dict (names of the member module) from stacked ``params`` and the buffers."""
        state = {**params, **self.fixed}
        return {name.removeprefix("net."): tensor[slot].detach().clone() for name, tensor in state.items()}

    def keep(self, slots: list[int], optimizer: torch.optim.Optimizer, extra: list[dict[str, Tensor]]):
        """Drop every slot not in ``slots`` from the weights, the Adam state and ``extra`` stacks (in place);
        returns the new optimizer."""
        index = torch.tensor(slots, device=next(iter(self.params.values())).device)
        new_params = {name: p.detach()[index].clone().requires_grad_(True) for name, p in self.params.items()}
        new_optimizer = type(optimizer)(list(new_params.values()), **optimizer.defaults)
        new_optimizer.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]
        for name, old in self.params.items():
            state = optimizer.state.get(old)
            if state:
                new_optimizer.state[new_params[name]] = {key: _rows(value, index) for key, value in state.items()}
        self.params = new_params
        self.fixed = {name: t[index] for name, t in self.fixed.items()}
        for stacks in extra:
            for name in list(stacks):
                stacks[name] = stacks[name][index].clone()
        self.active = [self.active[s] for s in slots]
        return new_optimizer


def _rows(value, index: Tensor):
    """An optimizer state entry for the kept slots ``index``: per-slot tensors sliced, scalars (step) copied."""
    if not torch.is_tensor(value):
        return value
    return value[index].clone() if value.ndim > 0 else value.clone()


@torch.no_grad()
def _restore(stack: _Stack, slot: int, state: dict[str, Tensor]) -> None:
    """Put a member's saved weights (its :meth:`_Stack.member_state`) back into its slot of the stack."""
    for name, p in stack.params.items():
        p[slot].copy_(state[name.removeprefix("net.")])


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    """``(A,)`` values shaped to multiply ``like`` ``(A, ...)`` slot by slot."""
    return values.view(-1, *([1] * (like.ndim - 1)))


def _train_stacked(
    stack: _Stack, members: Sequence[nn.Module], inputs: Tensor, context: Tensor | None, *, splits: list, histories,
    progress: bool, num_threads: int | None, max_epochs: int, batch_size: int, learning_rate: float,
    validation_fraction: float, patience: int, clip_grad_norm: float, weight_decay: float, ema_epochs: float,
    step_drops: int, step_drop_factor: float, drop_patience: int | None, checkpoint: Checkpoint | None = None,
    compile: bool = False,  # noqa: A002
    on_nonfinite: str = "stop",
) -> None:
    del validation_fraction  # the splits are made
    k = len(members)
    generators = [s[0] for s in splits]
    train_rows, val_rows = torch.stack([s[1] for s in splits]), torch.stack([s[2] for s in splits])
    n_train = train_rows.shape[1]
    batch_size = min(batch_size, n_train)
    steps_per_epoch = math.ceil(n_train / batch_size)
    for history in histories:
        history.stopped_early, history.diverged = False, False
        history.batch_size, history.learning_rate = batch_size, float(learning_rate)
        history.ema_epochs = float(ema_epochs)
        history.step_drop_epochs, history.restart_epochs = [], []
    firsts = [h.epochs for h in histories]
    optimizer = _adam(list(stack.params.values()), learning_rate=learning_rate, weight_decay=weight_decay)
    averaged = {name: p.detach().clone() for name, p in stack.params.items()}  # the weights scored and kept
    decay = max(0.0, 1.0 - 1.0 / (ema_epochs * steps_per_epoch)) if ema_epochs > 0 else 0.0
    updates = torch.zeros(k)  # weight-average updates per slot since its last (re)start
    factors = torch.ones(k)  # each member's step size as a multiple of learning_rate (step drops)
    rules = [Plateau(patience=patience, step_drops=step_drops, drop_patience=drop_patience) for _ in range(k)]
    best = [stack.member_state(slot, averaged) for slot in range(k)]  # per member, by member index
    begin, finished, key = 0, False, None
    if checkpoint is not None:
        weights = {f"member{m}/{name}": value for m in range(k) for name, value in stack.member_state(
            m, stack.params).items()}
        generator_states = {f"generator{m}": g.get_state() for m, g in enumerate(generators)}
        key = call_key({**weights, "inputs": inputs, "context": context, "train": train_rows, "validation": val_rows,
                        **generator_states},
                       {"max_epochs": max_epochs, "batch_size": batch_size, "learning_rate": float(learning_rate),
                        "patience": patience, "clip_grad_norm": float(clip_grad_norm),
                        "weight_decay": float(weight_decay), "ema_epochs": float(ema_epochs), "step_drops": step_drops,
                        "step_drop_factor": float(step_drop_factor), "drop_patience": drop_patience, "members": k,
                        "structure": checkpoint.structure, "model": repr(members[0]), "compile": compile,
                        **nonfinite_key(on_nonfinite)},
                       [h.as_dict() for h in histories])
        checkpoint.start()
        saved = checkpoint.load(key, inputs.device)
        if saved is not None:
            earlier = histories[0].epochs  # epochs before this call: the epoch is reported over all, as train's is
            begin, finished = int(saved["epoch"]), bool(saved["finished"])
            stack.active, stack.fixed = list(saved["active"]), saved["fixed"]
            stack.params = {name: value.clone().requires_grad_(True) for name, value in saved["params"].items()}
            optimizer = _adam(list(stack.params.values()), learning_rate=learning_rate, weight_decay=weight_decay)
            optimizer.load_state_dict(saved["optimizer"])
            averaged, best = saved["averaged"], saved["best"]
            updates, factors = saved["updates"].cpu(), saved["factors"].cpu()
            for rule, history, generator, rule_state, history_state, generator_state in zip(
                    rules, histories, generators, saved["rules"], saved["histories"], saved["generators"]):
                vars(rule).update(rule_state)
                vars(history).update(history_state)
                generator.set_state(generator_state.cpu())
            checkpoint.resumed(earlier + begin, finished)

    # compiled while every member trains: the stack's shapes change when one stops (then eager, no recompile)
    compiled = compiled_objective(stack.losses, batch_size=batch_size, enabled=compile)

    def state(epoch: int, done: bool, running: float = 0.0) -> dict:
        params = {name: value.detach() for name, value in stack.params.items()}
        return {"key": key, "epoch": epoch, "finished": done, "active": stack.active, "params": params,
                "fixed": stack.fixed, "optimizer": optimizer.state_dict(), "averaged": averaged, "updates": updates,
                "factors": factors, "best": best, "rules": [dict(vars(rule)) for rule in rules],
                "histories": [with_seconds(h.as_dict(), running) for h in histories],
                "generators": [g.get_state() for g in generators]}

    with deferred_stops(checkpoint):  # Ctrl-C / SIGTERM: the epoch ends, its checkpoint is written
        bar = _progress_bar(max_epochs) if progress else None
        if bar is not None and not finished:
            bar.update(begin)  # the epochs of a stopped call that this one resumes
        with torch_threads(num_threads):
            start = time.perf_counter()
            try:
                for epoch in range(begin, max_epochs) if not finished else ():
                    orders = torch.stack([
                        train_rows[m][torch.randperm(n_train, generator=generators[m]).to(inputs.device)]
                        for m in stack.active])
                    totals = torch.zeros(len(stack.active), dtype=torch.float64)
                    diverged = torch.zeros(len(stack.active), dtype=torch.bool)
                    for rows in orders.split(batch_size, dim=1):
                        losses = (compiled if len(stack.active) == k else stack.losses)(inputs, context, rows)
                        values = losses.detach().double().cpu()
                        diverged |= ~torch.isfinite(values)
                        if bool(diverged.all()):
                            break
                        training = ~diverged.to(losses.device)
                        optimizer.zero_grad(set_to_none=True)
                        torch.where(training, losses, torch.zeros_like(losses)).sum().backward()
                        _step(stack, optimizer, clip_grad_norm, factors[stack.active] * (~diverged))
                        if ema_epochs > 0:
                            _average(averaged, stack.params, updates[stack.active], decay, ~diverged)
                            updates[stack.active] += 1
                        totals += torch.where(diverged, 0.0, values) * rows.shape[1]
                    if ema_epochs == 0:
                        averaged = {name: p.detach() for name, p in stack.params.items()}
                    val = torch.full((len(stack.active),), math.nan, dtype=torch.float64)
                    if not bool(diverged.all()):
                        val = _validate(stack, averaged, inputs, context, val_rows[stack.active])
                    keep = []
                    for slot, m in enumerate(list(stack.active)):
                        history = histories[m]
                        if bool(diverged[slot]) or not math.isfinite(float(val[slot])):
                            if not may_restart(on_nonfinite, rules[m], history):
                                record_divergence(history, rules[m], firsts[m] + epoch, stacklevel=3)
                                continue
                            record_restart(history, rules[m], firsts[m] + epoch, stacklevel=3)
                            action, factor = "restart", RESTART_FACTOR
                        else:
                            history.train_loss.append(float(totals[slot]) / n_train)
                            history.validation_loss.append(float(val[slot]))
                            history.epochs += 1
                            improved, action = rules[m].observe(float(val[slot]), firsts[m] + epoch)
                            if improved:
                                best[m] = stack.member_state(slot, averaged)
                            if action == "drop":
                                history.step_drop_epochs.append(firsts[m] + epoch)
                            elif action == "stop":
                                history.stopped_early = True
                                continue
                            factor = step_drop_factor
                        if action in ("drop", "restart"):  # a plateau or a restart: on from its best weights
                            _restore(stack, slot, best[m])
                            updates[m] = 0
                            factors[m] *= factor
                        keep.append(slot)
                    if bar is not None:
                        bar.set_postfix(training=len(keep), best=f"{min(r.best_loss for r in rules):.3f}")
                        bar.update(1)
                    if not keep:
                        break
                    if len(keep) < len(stack.active):
                        optimizer = stack.keep(keep, optimizer, [averaged])
                    if checkpoint is not None:
                        checkpoint.epoch_end(lambda: state(epoch + 1, False, time.perf_counter() - start))
            finally:
                if bar is not None:
                    bar.close()
                seconds = time.perf_counter() - start
                for m, (member, rule, history) in enumerate(zip(members, rules, histories)):
                    member.load_state_dict(best[m])
                    member.eval()
                    if rule.best_epoch >= 0:
                        history.best_epoch, history.best_validation_loss = rule.best_epoch, rule.best_loss
                    history.seconds += seconds
        if checkpoint is not None and not finished:  # training ended: the next identical call returns at once
            checkpoint.save(state(max_epochs, True))


@torch.no_grad()
def _step(stack: _Stack, optimizer: torch.optim.Optimizer, clip_grad_norm: float, factors: Tensor) -> None:
    """Clip each slot's gradient to ``clip_grad_norm``; take Adam steps of the optimizer's step size times ``factors``.

    Adam's update is proportional to its step size, so slot ``i`` takes the optimizer's step scaled by
    ``factors[i]`` (0 leaves the slot's weights unchanged: a slot whose loss diverged this epoch).
    """
    params = list(stack.params.values())
    grads = [p.grad for p in params]
    if math.isfinite(clip_grad_norm):
        norms = torch.stack([g.flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()
        scale = (clip_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(_broadcast(scale, g))
    factors = factors.to(params[0].device, params[0].dtype)
    scaled = not bool((factors == 1).all())
    before = [p.detach().clone() for p in params] if scaled else None
    optimizer.step()
    if scaled:
        for p, old in zip(params, before):
            p.sub_(old).mul_(_broadcast(factors, p)).add_(old)


@torch.no_grad()
def _average(averaged: dict, params: dict, updates: Tensor, decay: float, training: Tensor) -> None:
    """Fold each slot's weights into its exponential average (as :class:`~sbiflows.weight_average.WeightAverage`)."""
    weight = 1.0 - torch.minimum(torch.full_like(updates, decay), (1 + updates) / (10 + updates))
    weight = torch.where(updates == 0, 1.0, weight) * training.to(weight.dtype)
    for name, p in params.items():
        average = averaged[name]
        average.lerp_(p.detach(), _broadcast(weight.to(average.device, average.dtype), average))


@torch.no_grad()
def _validate(stack: _Stack, params: dict, inputs: Tensor, context: Tensor | None, rows: Tensor) -> Tensor:
    """``(A,)`` mean validation losses of the weights ``params``, slot ``i`` on rows ``rows[i]``."""
    total = torch.zeros(rows.shape[0], dtype=torch.float64)
    for part in rows.split(_EVAL_CHUNK, dim=1):
        total += stack.losses(inputs, context, part, params).double().cpu() * part.shape[1]
    return total / rows.shape[1]

"""Maximum-likelihood training of any module with ``log_prob(inputs, context)``.

The loss is the lecture's negative log-likelihood: ``-log p(x) = -(log p_Z(f^{-1}(x)) + sum_k logdet_k)``,
averaged over a minibatch. Training uses Adam, a validation split, early stopping that restores the best
weights, gradient-norm clipping and an optional progress bar.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class TrainingHistory:
    """What happened during training (losses are mean negative log-likelihoods per row).

    Attributes:
        train_loss: Training loss per epoch.
        validation_loss: Validation loss per epoch.
        best_epoch: Epoch (0-based) whose weights were restored.
        best_validation_loss: Validation loss of the restored weights.
        epochs: Number of epochs run.
        stopped_early: Whether early stopping ended training.
        diverged: Whether training stopped on a non-finite loss (best weights restored).
        seconds: Wall time of training.
    """

    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    best_validation_loss: float = math.inf
    epochs: int = 0
    stopped_early: bool = False
    diverged: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict:
        """A JSON-serialisable dictionary."""
        return dict(self.__dict__)


def train(
    model: nn.Module,
    inputs: Tensor,
    context: Tensor | None = None,
    *,
    max_epochs: int = 500,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    validation_fraction: float = 0.1,
    patience: int = 20,
    clip_grad_norm: float = 5.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    history: TrainingHistory | None = None,
) -> TrainingHistory:
    """Fit ``model`` by maximum likelihood on ``inputs`` (rows), optionally conditioned on ``context``.

    Args:
        model: A module with ``log_prob(inputs, context) -> (N,)`` (e.g. a :class:`~sbiflows.flows.Flow`).
        inputs: ``(N, D)`` training data.
        context: ``(N, C)`` conditioning variables, one row per input row, or None.
        max_epochs: Upper bound on passes over the training split.
        batch_size: Minibatch size.
        learning_rate: Adam step size.
        validation_fraction: Share of rows held out for early stopping.
        patience: Epochs without validation improvement before stopping.
        clip_grad_norm: Maximum gradient norm.
        weight_decay: Adam weight decay.
        seed: Seeds the split and the minibatch order (the model's initial weights are the caller's).
        progress: Show a progress bar with the current losses.
        history: Continue this history (e.g. when training again with more data).

    Returns:
        The :class:`TrainingHistory`; the model holds the weights of the best validation epoch.

    Raises:
        ValueError: On mismatched rows or a split that leaves too few rows.
        FloatingPointError: If the loss is non-finite before any finite validation loss was reached
            (otherwise a non-finite loss stops training with a warning and restores the best weights).

    Example:
        >>> from sbiflows.flows import maf
        >>> flow = maf(2, transforms=1, hidden_features=(8, 8))
        >>> hist = train(flow, torch.randn(200, 2), max_epochs=2, batch_size=50)
        >>> hist.epochs
        2
    """
    n = _check_rows(inputs, context)
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    n_val = max(1, int(round(n * validation_fraction)))
    n_train = n - n_val
    if n_train < 1 or n_val < 1:
        raise ValueError(f"need at least 2 rows for a training and a validation split, got {n}")
    if batch_size > n_train:
        batch_size = n_train
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator).to(inputs.device)
    train_idx, val_idx = perm[:n_train], perm[n_train:]

    history = history or TrainingHistory()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    best_state = copy.deepcopy(model.state_dict())
    best_loss, best_epoch, since_best = math.inf, -1, 0
    bar = _progress_bar(max_epochs) if progress else None
    start = time.perf_counter()
    try:
        for epoch in range(max_epochs):
            model.train()
            order = train_idx[torch.randperm(n_train, generator=generator).to(inputs.device)]
            total, diverged = 0.0, False
            for batch in order.split(batch_size):
                loss = -model.log_prob(inputs[batch], None if context is None else context[batch]).mean()
                if not torch.isfinite(loss):
                    diverged = True
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
                optimizer.step()
                total += loss.item() * len(batch)
            val_loss = math.nan if diverged else _evaluate(model, inputs, context, val_idx)
            if diverged or not math.isfinite(val_loss):
                history.diverged = True
                if best_epoch < 0:
                    raise FloatingPointError(
                        f"non-finite loss at epoch {epoch} before any finite validation loss; try a lower "
                        "learning_rate or check the data for extreme values"
                    )
                warnings.warn(
                    f"training diverged (non-finite loss) at epoch {epoch}; restored the best weights "
                    f"(epoch {best_epoch}, validation loss {best_loss:.4f})",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            history.train_loss.append(total / n_train)
            history.validation_loss.append(val_loss)
            history.epochs += 1
            if val_loss < best_loss:
                best_loss, best_epoch, since_best = val_loss, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
            if bar is not None:
                bar.set_postfix(train=f"{total / n_train:.3f}", val=f"{val_loss:.3f}", best=f"{best_loss:.3f}")
                bar.update(1)
            if since_best >= patience:
                history.stopped_early = True
                break
    finally:
        if bar is not None:
            bar.close()
        model.load_state_dict(best_state)
        model.eval()
        history.best_epoch = best_epoch
        history.best_validation_loss = best_loss
        history.seconds += time.perf_counter() - start
    return history


def _check_rows(inputs: Tensor, context: Tensor | None) -> int:
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.ndim != 2:
        raise ValueError(f"inputs must have shape (N, D), got {tuple(inputs.shape)}")
    if context is not None:
        if not isinstance(context, Tensor):
            raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
        if context.ndim != 2 or len(context) != len(inputs):
            raise ValueError(
                f"context must have shape ({len(inputs)}, C) to match inputs, got {tuple(context.shape)}"
            )
    return len(inputs)


@torch.no_grad()
def _evaluate(model: nn.Module, inputs: Tensor, context: Tensor | None, idx: Tensor, chunk: int = 8192) -> float:
    model.eval()
    total = 0.0
    for part in idx.split(chunk):
        lp = model.log_prob(inputs[part], None if context is None else context[part])
        total += -lp.sum().item()
    return total / len(idx)


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="training", unit="epoch", leave=False)

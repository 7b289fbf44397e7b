"""The classifier behind :func:`~sbiflows.diagnostics.c2st`: two-hidden-layer ReLU MLPs, one per fold of each
pair of sample sets, with stacked weights, a hand-written backward pass and Adam on one flat buffer (the sbibm
protocol's scikit-learn ``MLPClassifier`` settings; see :mod:`sbiflows.diagnostics.c2st`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__: list[str] = []


def _fold_ids(n: int, folds: int, generator: torch.Generator) -> Tensor:
    """A test-fold number for each of ``n`` samples of one class: a random, balanced assignment."""
    ids = torch.empty(n, dtype=torch.long)
    ids[torch.randperm(n, generator=generator)] = torch.arange(n) % folds
    return ids


class _FoldMLP:
    """``folds`` independent 2-hidden-layer ReLU MLPs per pair, with stacked weights and a manual backward.

    All parameters live in one flat ``(pairs * folds, P)`` buffer; :meth:`views` gives ``W1, b1, W2, b2, W3, b3``
    of any rows of it, so a step can run on the folds still training alone.
    """

    def __init__(self, dim: int, hidden: int, folds: int, generators: list[torch.Generator]) -> None:
        self.shapes = [(dim, hidden), (hidden, hidden), (hidden, 1)]
        sizes = [s for fan_in, fan_out in self.shapes for s in (fan_in * fan_out, fan_out)]
        self.params = torch.empty(len(generators) * folds, sum(sizes))
        for q, generator in enumerate(generators):  # each pair's folds from its own generator, as c2st draws them
            for view, (fan_in, fan_out) in zip(self.views(self.params[q * folds : (q + 1) * folds]),
                                               [shape for shape in self.shapes for _ in range(2)]):
                # Glorot-uniform for weights and biases, with scikit-learn's factor 6 for ReLU nets.
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                view.copy_((torch.rand(view.shape, generator=generator) * 2 - 1) * bound)

    def views(self, params: Tensor) -> list[Tensor]:
        """``W1, b1, W2, b2, W3, b3`` of ``params`` ``(F, P)``: views ``(F, fan_in, fan_out)`` and
        ``(F, 1, fan_out)``."""
        views, offset = [], 0
        for fan_in, fan_out in self.shapes:
            for shape in ((fan_in, fan_out), (1, fan_out)):
                size = shape[0] * shape[1]
                views.append(params[:, offset : offset + size].view(len(params), *shape))
                offset += size
        return views

    def _forward(self, params: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Hidden activations and logits for ``x`` of shape ``(F, B, dim)``."""
        w1, b1, w2, b2, w3, b3 = self.views(params)
        h1 = torch.baddbmm(b1, x, w1).clamp_min_(0)
        h2 = torch.baddbmm(b2, h1, w2).clamp_min_(0)
        return h1, h2, torch.baddbmm(b3, h2, w3).squeeze(-1)

    def logits(self, params: Tensor, x: Tensor) -> Tensor:
        """Logits of class ``b`` for inputs ``x`` of shape ``(F, B, dim)`` -> ``(F, B)``."""
        return self._forward(params, x)[-1]

    def _loss_and_grad(self, params: Tensor, x: Tensor, y: Tensor, w: Tensor, l2: float) -> tuple[Tensor, Tensor]:
        """Per-fold weighted log-loss plus L2 penalty, and its gradient as a ``(F, P)`` tensor."""
        w1, _, w2, _, w3, _ = self.views(params)
        h1, h2, logit = self._forward(params, x)
        count = w.sum(1).clamp_min(1.0)  # (F,) real (non-padding) samples in the batch (fit skips a batch of none)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none")
        squares = sum(v.square().sum((1, 2)) for v in (w1, w2, w3))
        loss = ((bce * w).sum(1) + 0.5 * l2 * squares) / count
        # Gradients of count * loss; divided by count once, on the flat vector, below.
        dz3 = ((torch.sigmoid(logit) - y) * w).unsqueeze(-1)  # (F, B, 1)
        dz2 = torch.bmm(dz3, w3.transpose(1, 2)).mul_(h2.sign())  # ReLU derivative: 1 where h2 > 0
        dz1 = torch.bmm(dz2, w2.transpose(1, 2)).mul_(h1.sign())
        grads = [
            torch.baddbmm(w1, x.transpose(1, 2), dz1, beta=l2),
            dz1.sum(1, keepdim=True),
            torch.baddbmm(w2, h1.transpose(1, 2), dz2, beta=l2),
            dz2.sum(1, keepdim=True),
            torch.baddbmm(w3, h2.transpose(1, 2), dz3, beta=l2),
            dz3.sum(1, keepdim=True),
        ]
        return loss, torch.cat([g.flatten(1) for g in grads], dim=1).div_(count.unsqueeze(1))

    def fit(
        self,
        data: Tensor,
        labels: Tensor,
        fold_of: Tensor,
        *,
        generators: list[torch.Generator],
        max_epochs: int,
        batch_size: int,
        learning_rate: float,
        l2: float,
        tol: float,
        patience: int,
        on_epoch: Callable[[int], None] | None = None,
    ) -> Tensor:
        """Train fold ``f`` of pair ``q`` on the samples of ``data[q]`` with ``fold_of[q] != f``; returns the
        epochs used per fold, ``(pairs * folds,)``. ``on_epoch(k)``, if given, hears after each epoch how many
        folds have finished (a progress bar; it changes nothing).

        Each epoch runs only the folds still training (their rows of the parameters and Adam's moments are
        taken out, stepped and put back): a fold that converged is frozen exactly as if it had trained
        alone, and a pair whose folds all converged draws no more minibatch orders from its generator.
        """
        pairs, two_n = fold_of.shape
        folds = self.params.shape[0] // pairs
        # Training indices per fold into the pairs' rows stacked, padded to a common length (padding weight 0).
        train = [torch.nonzero(fold_of[q] != f).squeeze(1) + q * two_n for q in range(pairs) for f in range(folds)]
        num_train = torch.tensor([len(t) for t in train], dtype=torch.float32)
        width = int(num_train.max())
        index = torch.zeros(len(train), width, dtype=torch.long)
        mask = torch.zeros(len(train), width)
        for f, t in enumerate(train):
            index[f, : len(t)], mask[f, : len(t)] = t, 1.0
        data, labels = data.reshape(pairs * two_n, -1), labels.repeat(pairs)

        beta1, beta2, eps = 0.9, 0.999, 1e-8
        m, v = torch.zeros_like(self.params), torch.zeros_like(self.params)
        active = torch.ones(len(train), dtype=torch.bool)
        best = torch.full((len(train),), math.inf)
        stale = torch.zeros(len(train), dtype=torch.long)
        epochs = torch.zeros(len(train), dtype=torch.long)
        step = 0
        for _ in range(max_epochs):
            live = [q for q in range(pairs) if bool(active[q * folds : (q + 1) * folds].any())]
            order = torch.cat([torch.argsort(torch.rand(folds, width, generator=generators[q]), dim=1) for q in live])
            rows = torch.cat([torch.arange(q * folds, (q + 1) * folds) for q in live])
            training = active[rows]
            order, rows = order[training], rows[training]
            batch_index, batch_mask = index[rows].gather(1, order), mask[rows].gather(1, order)
            params, m_rows, v_rows = self.params[rows], m[rows], v[rows]
            epoch_loss = torch.zeros(len(rows))
            for start in range(0, width, batch_size):
                idx = batch_index[:, start : start + batch_size]
                w = batch_mask[:, start : start + batch_size]
                loss, grad = self._loss_and_grad(params, data[idx], labels[idx], w, l2)
                epoch_loss += loss * w.sum(1)
                step += 1
                empty = w.sum(1) == 0  # a fold whose batch is all padding (batch_size <= 2): it does not step
                before = (m_rows.clone(), v_rows.clone()) if bool(empty.any()) else None
                m_rows.mul_(beta1).add_(grad, alpha=1 - beta1)
                v_rows.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                lr = learning_rate * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                # the step size as a float32 tensor, as it was when frozen folds stepped with a rate of 0
                rate = torch.full((len(rows), 1), lr)
                if before is not None:
                    rate[empty] = 0.0
                    m_rows[empty], v_rows[empty] = before[0][empty], before[1][empty]
                params.sub_(rate * m_rows / (v_rows.sqrt() + eps))
            self.params[rows], m[rows], v[rows] = params, m_rows, v_rows
            epochs[rows] += 1
            epoch_loss /= num_train[rows]
            stale[rows] = torch.where(epoch_loss > best[rows] - tol, stale[rows] + 1, torch.zeros_like(stale[rows]))
            best[rows] = torch.minimum(best[rows], epoch_loss)
            active[rows] = stale[rows] <= patience
            if on_epoch is not None:
                on_epoch(int((~active).sum()))
            if not active.any():
                break
        if on_epoch is not None:  # max_epochs ends the folds still training too
            on_epoch(len(train))
        return epochs

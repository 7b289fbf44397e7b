"""Classifier two-sample test (C2ST) with the sbibm protocol, trained in torch.

The test asks how well a classifier can tell two sets of samples apart: a cross-validated accuracy of
0.5 means the sets are indistinguishable, 1.0 means they are disjoint. The protocol follows sbibm
(Lueckmann et al. 2021), which used scikit-learn's ``MLPClassifier``:

* both sets are z-scored with the mean and standard deviation of the *first* set;
* an MLP with two ReLU hidden layers of ``10 * dim`` units and a logistic output;
* Adam (learning rate 1e-3, minibatches of 200, L2 penalty 1e-4, Glorot-uniform initialisation),
  trained until the training loss has not improved by ``tol`` for ``patience + 1`` consecutive
  epochs, or for at most ``max_epochs`` epochs -- no validation-based early stopping;
* the accuracy is the mean over a stratified ``folds``-fold cross-validation.

All folds are trained at once: their weights are stacked along a leading fold axis and every layer
is one batched matrix product, with a hand-written backward pass and Adam update on one flat
parameter buffer, so an epoch costs a handful of small kernels instead of ``folds`` separate
training loops. Training follows the thread rule of :mod:`sbiflows.threads` (one intra-op thread
unless you chose otherwise): the matrices are so small that a second thread only adds
synchronisation.

What the numbers mean: under the null hypothesis (same distribution) the accuracy scatters around
0.5 with a standard deviation of about 0.011-0.017 for 1,000 samples per set in 2-D (and larger for
fewer samples), and small classifiers may even score slightly below 0.5. A gate at 0.55 therefore
fires by chance; the default ``threshold=0.6`` is a safe "indistinguishable" verdict at n >= 1,000.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sbiflows.checks import check_int, check_positive_number, check_real
from sbiflows.threads import torch_threads

__all__ = ["C2STResult", "c2st", "c2st_batched"]


@dataclass(frozen=True)
class C2STResult:
    """Outcome of :func:`c2st`.

    Attributes:
        accuracy: Mean cross-validated accuracy (0.5 = indistinguishable, 1.0 = disjoint).
        fold_accuracies: Test accuracy of each fold.
        threshold: The accuracy at or below which the test passes.
        passed: ``accuracy <= threshold``.
        num_samples: Number of samples in each set.
        dim: Dimension of the samples.
        epochs: Number of training epochs of each fold (``max_epochs`` if it did not converge).
    """

    accuracy: float
    fold_accuracies: tuple[float, ...]
    threshold: float
    passed: bool
    num_samples: int
    dim: int
    epochs: tuple[int, ...]

    def __str__(self) -> str:
        folds = ", ".join(f"{a:.3f}" for a in self.fold_accuracies)
        if self.passed:
            verdict = "PASSED: a classifier cannot reliably tell the two sample sets apart."
        else:
            verdict = (
                "FAILED: a classifier separates the sets better than chance; the distributions "
                "differ (1.0 would mean disjoint)."
            )
        return (
            f"C2ST ({len(self.fold_accuracies)}-fold MLP classifier, {self.num_samples} vs "
            f"{self.num_samples} samples in {self.dim}-D)\n"
            f"  accuracy {self.accuracy:.3f} (0.5 = indistinguishable), threshold {self.threshold:.3f}\n"
            f"  fold accuracies: {folds}\n"
            f"  {verdict}"
        )


def c2st(
    samples_a: Tensor,
    samples_b: Tensor,
    *,
    seed: int = 0,
    folds: int = 5,
    threshold: float = 0.6,
    z_score: bool = True,
    max_epochs: int = 1000,
    batch_size: int = 200,
    learning_rate: float = 1e-3,
    l2: float = 1e-4,
    tol: float = 1e-4,
    patience: int = 10,
    num_threads: int | None = None,
) -> C2STResult:
    """Classifier two-sample test: cross-validated accuracy of an MLP telling ``a`` from ``b``.

    Args:
        samples_a: First sample set, shape ``(N, D)``; also provides the z-scoring statistics.
        samples_b: Second sample set, shape ``(N, D)`` (same ``N``, so that chance is 0.5).
        seed: Seeds the fold split, the initialisation and the minibatch order (results are
            reproducible; torch's global random state is neither used nor changed).
        folds: Number of stratified cross-validation folds (at least 2, at most ``N``).
        threshold: The test passes if the accuracy is at most this, in ``(0.5, 1]``.
        z_score: Standardise both sets with the mean and standard deviation of ``samples_a`` (for a
            column that is constant in ``samples_a``, the standard deviation of both sets together).
        max_epochs: Upper limit on training epochs per fold.
        batch_size: Minibatch size (per fold).
        learning_rate: Adam learning rate.
        l2: L2 penalty on the weights (scikit-learn's ``alpha``).
        tol: Minimum improvement of the epoch training loss that counts as progress.
        patience: Training stops after more than ``patience`` epochs without progress.
        num_threads: torch threads for the classifier; None: the rule of :mod:`sbiflows.threads`.

    Returns:
        A :class:`C2STResult` with the mean and per-fold accuracies and the verdict.

    Raises:
        TypeError: If a sample set is not a floating-point ``torch.Tensor``.
        ValueError: On wrong shapes, different sizes or dimensions, non-finite values, too few
            samples for the folds, or options out of range.

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> a, b = torch.randn(500, 2, generator=generator), torch.randn(500, 2, generator=generator)
        >>> result = c2st(a, b + 3.0)  # shifted by 3 sd: easy to tell apart
        >>> result.accuracy > 0.9, result.passed
        (True, False)
    """
    return c2st_batched([(samples_a, samples_b)], seed=seed, folds=folds, threshold=threshold, z_score=z_score,
                        max_epochs=max_epochs, batch_size=batch_size, learning_rate=learning_rate, l2=l2, tol=tol,
                        patience=patience, num_threads=num_threads)[0]


def c2st_batched(
    pairs: Sequence[tuple[Tensor, Tensor]],
    *,
    seed: int = 0,
    folds: int = 5,
    threshold: float = 0.6,
    z_score: bool = True,
    max_epochs: int = 1000,
    batch_size: int = 200,
    learning_rate: float = 1e-3,
    l2: float = 1e-4,
    tol: float = 1e-4,
    patience: int = 10,
    num_threads: int | None = None,
) -> list[C2STResult]:
    """:func:`c2st` of several pairs of sample sets at once, e.g. a posterior against the reference for
    each of a task's observations: the same results as one :func:`c2st` call per pair with the same
    options and ``seed``, in a fraction of the time.

    The classifiers of all pairs and folds train side by side, each step one batched pass over the folds
    that are still training (a fold that has converged leaves the batch), so the fixed cost of a step is
    paid once for all pairs rather than once per pair.

    Args:
        pairs: ``(samples_a, samples_b)`` pairs as :func:`c2st` takes them, all of the same shape ``(N, D)``.
        seed, folds, threshold, z_score, max_epochs, batch_size, learning_rate, l2, tol, patience,
        num_threads: As :func:`c2st`'s, for every pair.

    Returns:
        One :class:`C2STResult` per pair, in order.

    Raises:
        TypeError, ValueError: As :func:`c2st`, naming the pair; ValueError if the pairs differ in shape.

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> a, b = torch.randn(500, 2, generator=generator), torch.randn(500, 2, generator=generator)
        >>> [round(r.accuracy, 2) > 0.9 for r in c2st_batched([(a, b), (a, b + 3.0)])]
        [False, True]
    """
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError(f"pairs must be a non-empty list of (samples_a, samples_b) pairs, got {pairs!r:.80}")
    sets = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"pairs[{i}] must be a (samples_a, samples_b) pair, got {type(pair).__name__}")
        names = ("samples_a", "samples_b") if len(pairs) == 1 else (f"pairs[{i}][0]", f"pairs[{i}][1]")
        a, b = _check_samples(pair[0], names[0]), _check_samples(pair[1], names[1])
        _check_options(a, b, folds, threshold, max_epochs, batch_size, learning_rate, patience)
        if sets and a.shape != sets[0][0].shape:
            raise ValueError(f"every pair must have the shape of the first, {tuple(sets[0][0].shape)}; pairs[{i}] has "
                             f"{tuple(a.shape)}")
        sets.append((a, b))
    n, dim = sets[0][0].shape
    generators = [torch.Generator().manual_seed(int(seed)) for _ in sets]
    data, fold_of = [], []
    for (a, b), generator in zip(sets, generators):
        if z_score:
            mean, std = a.mean(0), a.std(0)
            # a column constant in a (a point mass) is scaled by the spread of both sets, so that b's distance
            # from it counts (scaling by 1 called a point and the point shifted by 1e-3 indistinguishable)
            pooled = torch.cat([a, b]).std(0)
            std = torch.where(std > 0, std, torch.where(pooled > 0, pooled, torch.ones_like(std)))
            a, b = (a - mean) / std, (b - mean) / std
        data.append(torch.cat([a, b]).to(torch.float32))
        fold_of.append(torch.cat([_fold_ids(n, folds, generator), _fold_ids(n, folds, generator)]))
    labels = torch.cat([torch.zeros(n), torch.ones(n)])

    with torch_threads(num_threads):  # tiny matrices: extra threads only synchronise (see sbiflows.threads)
        mlp = _FoldMLP(dim, 10 * dim, folds, generators)
        epochs = mlp.fit(torch.stack(data), labels, torch.stack(fold_of), generators=generators, max_epochs=max_epochs,
                         batch_size=batch_size, learning_rate=learning_rate, l2=l2, tol=tol, patience=patience)
        results = []
        for q, (x, groups) in enumerate(zip(data, fold_of)):
            rows = slice(q * folds, (q + 1) * folds)
            correct = (mlp.logits(mlp.params[rows], x.expand(folds, -1, -1)) > 0).float() == labels  # (F, 2N)
            in_fold = groups == torch.arange(folds).unsqueeze(1)  # (F, 2N): each fold's test set
            fold_acc = (correct & in_fold).sum(1) / in_fold.sum(1)
            accuracy = float(fold_acc.mean())
            results.append(C2STResult(accuracy=accuracy, fold_accuracies=tuple(float(v) for v in fold_acc),
                                      threshold=float(threshold), passed=accuracy <= threshold, num_samples=n,
                                      dim=dim, epochs=tuple(int(e) for e in epochs[rows])))
    return results


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
        """``W1, b1, W2, b2, W3, b3`` of ``params`` ``(F, P)``, as views ``(F, fan_in, fan_out)`` and ``(F, 1, fan_out)``."""
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
        count = w.sum(1)  # (F,) real (non-padding) samples in the batch
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
    ) -> Tensor:
        """Train fold ``f`` of pair ``q`` on the samples of ``data[q]`` with ``fold_of[q] != f``; returns the
        epochs used per fold, ``(pairs * folds,)``.

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
                m_rows.mul_(beta1).add_(grad, alpha=1 - beta1)
                v_rows.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                lr = learning_rate * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                params.sub_(torch.full((len(rows), 1), lr) * m_rows / (v_rows.sqrt() + eps))
            self.params[rows], m[rows], v[rows] = params, m_rows, v_rows
            epochs[rows] += 1
            epoch_loss /= num_train[rows]
            stale[rows] = torch.where(epoch_loss > best[rows] - tol, stale[rows] + 1, torch.zeros_like(stale[rows]))
            best[rows] = torch.minimum(best[rows], epoch_loss)
            active[rows] = stale[rows] <= patience
            if not active.any():
                break
        return epochs


def _check_samples(samples: object, name: str) -> Tensor:
    if not isinstance(samples, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(samples).__name__}")
    if not samples.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {samples.dtype}")
    if samples.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        bad = int((~torch.isfinite(samples)).any(1).sum())
        raise ValueError(f"{name} contains {bad} rows with NaN or inf values; remove them first")
    return samples.detach().to("cpu", torch.float64)


def _check_options(
    a: Tensor,
    b: Tensor,
    folds: int,
    threshold: float,
    max_epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"samples_a and samples_b must have the same dimension, got {a.shape[1]} and {b.shape[1]}"
        )
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            "samples_a and samples_b must have the same number of samples (so that chance level "
            f"is 0.5), got {a.shape[0]} and {b.shape[0]}"
        )
    check_int(folds, "folds", minimum=2)
    if a.shape[0] < folds:
        raise ValueError(
            f"too few samples for {folds} folds: each set needs at least {folds} samples, "
            f"got {a.shape[0]}"
        )
    check_real(threshold, "threshold", low=0.5, high=1.0, low_open=True)
    check_int(max_epochs, "max_epochs", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    check_positive_number(learning_rate, "learning_rate")
    check_int(patience, "patience", minimum=0)

"""Compare ``sbiflows.diagnostics.c2st`` with a scikit-learn reference of the same protocol.

The reference is the sbibm C2ST protocol with scikit-learn's ``MLPClassifier`` (ReLU, two hidden
layers of ``10 * dim`` units, Adam, ``max_iter=1000``, no validation early stopping), z-scoring with
the first set's mean and standard deviation, and a stratified, shuffled 5-fold cross-validation.
Both are run on the same samples: identical distributions (accuracy ~0.5), disjoint ones (~1.0) and
Gaussians whose first coordinate is shifted by several amounts, in 2-D and 5-D. Afterwards it times
our C2ST on 10,000 vs 10,000 samples in 2-D (median of 3 runs).

scikit-learn is not a dependency of sbiflows; without it only our numbers and timings are printed.

Usage:
    python examples/c2st_reference_check.py            # 1,000 samples per set
    python examples/c2st_reference_check.py --n 2000 --skip-timing
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from sbiflows.diagnostics import c2st

CASES: list[tuple[str, float]] = [
    ("identical", 0.0),
    ("shift 0.25", 0.25),
    ("shift 0.5", 0.5),
    ("shift 1.0", 1.0),
    ("shift 2.0", 2.0),
    ("disjoint", 20.0),
]


def reference_c2st(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float | None:
    """The sbibm protocol with scikit-learn, or ``None`` if scikit-learn is not installed."""
    try:
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.neural_network import MLPClassifier
    except ImportError:
        return None
    mean, std = a.mean(0), a.std(0, ddof=1)
    data = np.concatenate([(a - mean) / std, (b - mean) / std])
    target = np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    dim = a.shape[1]
    clf = MLPClassifier(
        activation="relu",
        hidden_layer_sizes=(10 * dim, 10 * dim),
        max_iter=1000,
        solver="adam",
        random_state=seed,
    )
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(clf, data, target, cv=folds, scoring="accuracy")))


def gaussians(n: int, dim: int, shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two standard-normal sets; the first coordinate of the second is shifted by ``shift``."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, generator=generator)
    b = torch.randn(n, dim, generator=generator)
    b[:, 0] += shift
    return a, b


def compare(n: int, seed: int) -> None:
    import warnings

    header = f"{'case':<11} {'d':>2} {'ours':>7} {'sklearn':>8} {'diff':>8} {'t_ours':>7} {'t_sk':>7}"
    print(f"C2ST, {n} vs {n} samples, seed {seed}\n{header}\n{'-' * len(header)}")
    for dim in (2, 5):
        for name, shift in CASES:
            a, b = gaussians(n, dim, shift, seed=seed + dim)
            start = time.perf_counter()
            ours = c2st(a, b, seed=seed).accuracy
            t_ours = time.perf_counter() - start
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning at max_iter
                ref = reference_c2st(a.numpy(), b.numpy(), seed=seed)
            t_ref = time.perf_counter() - start
            ref_txt = "n/a" if ref is None else f"{ref:.4f}"
            diff_txt = "n/a" if ref is None else f"{ours - ref:+.4f}"
            t_ref_txt = "n/a" if ref is None else f"{t_ref:.1f}s"
            print(
                f"{name:<11} {dim:>2} {ours:>7.4f} {ref_txt:>8} {diff_txt:>8} "
                f"{t_ours:>6.1f}s {t_ref_txt:>7}",
                flush=True,
            )


def timing(repeats: int = 3) -> None:
    a, b = gaussians(10_000, 2, 0.5, seed=0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = c2st(a, b)
        times.append(time.perf_counter() - start)
    print(
        f"\nTiming: C2ST on 10,000 vs 10,000 samples in 2-D (shift 0.5, accuracy "
        f"{result.accuracy:.4f}): median {statistics.median(times):.2f}s over {repeats} runs "
        f"({', '.join(f'{t:.2f}s' for t in times)}); torch threads: {torch.get_num_threads()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="samples per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    compare(args.n, args.seed)
    if not args.skip_timing:
        timing()


if __name__ == "__main__":
    main()

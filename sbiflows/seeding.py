"""Independent random streams from one user seed.

One ``seed`` argument drives several random steps (prior draws, simulator noise, posterior sampling).
Seeding each step's generator with the same integer makes their streams *identical*: with
``torch.manual_seed(0)`` for the prior and ``Generator().manual_seed(0)`` inside a Gaussian simulator,
the noise equals the standardized parameters and ``x = 2 * theta`` exactly, and posterior samples drawn
with seed 0 coincide point by point with reference samples drawn with seed 0 (C2ST then falls below
0.5). :func:`derive_seed` gives every step its own stream, reproducibly, with NumPy's ``SeedSequence``
(the standard way to spawn independent streams from one seed). :class:`SeededNoise` is the base noise
of a seeded posterior draw, one stream per observation, so the samples do not depend on chunking.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from sbiflows.checks import check_int

__all__ = ["SeededNoise", "derive_seed", "global_seed", "kept_generators", "stream_seeds"]


@contextmanager
def global_seed(seed: int) -> Iterator[None]:
    """Run the block with torch's global generators seeded with ``seed``, each restored afterwards.

    They are the CPU's and those of CUDA devices already initialized (a posterior or a simulator on the GPU
    draws from them). ``torch.manual_seed`` inside ``torch.random.fork_rng(devices=[])`` left the CUDA
    generators reseeded, or queued the seed for a CUDA initialized later; this touches no other device.

    Example:
        >>> state = torch.random.get_rng_state()
        >>> with global_seed(3):
        ...     a = torch.rand(2)
        >>> with global_seed(3):
        ...     b = torch.rand(2)
        >>> torch.equal(a, b), torch.equal(torch.random.get_rng_state(), state)
        (True, True)
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for device in devices:
            torch.cuda.default_generators[device].manual_seed(seed)
        yield


@contextmanager
def kept_generators() -> Iterator[None]:
    """Run the block and restore torch's global generators (as :func:`global_seed` chooses them) and NumPy's
    global one afterwards: simulator calls on a thread pool seed them concurrently, so each call's own restore
    can leave another call's seed behind.

    Example:
        >>> state = np.random.get_state()[1].copy()
        >>> with kept_generators():
        ...     np.random.seed(5)
        >>> bool((np.random.get_state()[1] == state).all())
        True
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(numpy_state)


def derive_seed(seed: int, stream: str | int) -> int:
    """A seed for the random stream named ``stream``, derived from the user's ``seed``.

    Different ``(seed, stream)`` pairs give statistically independent generators; the same pair always
    gives the same seed.

    Args:
        seed: The user's seed (any int; negative values are allowed).
        stream: The name (or number) of the step, e.g. ``"prior"`` or ``"simulate"``.

    Returns:
        An int in ``[0, 2**63)``, suitable for ``torch.Generator().manual_seed``.

    Example:
        >>> derive_seed(0, "prior") == derive_seed(0, "prior")
        True
        >>> derive_seed(0, "prior") != derive_seed(0, "simulate") != derive_seed(1, "prior")
        True
    """
    check_int(seed, "seed")
    key = zlib.crc32(stream.encode()) if isinstance(stream, str) else int(stream)
    sequence = np.random.SeedSequence([int(seed) % 2**64, key % 2**64])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def stream_seeds(seed: int, stream: str, count: int) -> np.ndarray:
    """``count`` 32-bit seeds of the random stream named ``stream`` (e.g. one per row of a chunk).

    32 bits because NumPy's legacy ``np.random.seed`` refuses more; the first ``k`` seeds do not depend
    on ``count``.

    Example:
        >>> stream_seeds(0, "simulate/0/rows", 3).dtype
        dtype('uint32')
        >>> bool((stream_seeds(0, "a", 5)[:3] == stream_seeds(0, "a", 3)).all())
        True
    """
    check_int(seed, "seed")
    sequence = np.random.SeedSequence([int(seed) % 2**64, zlib.crc32(stream.encode())])
    return sequence.generate_state(count, dtype=np.uint32)


class SeededNoise:
    """Base noise of a seeded draw, in fixed blocks, so that the samples do not depend on chunking.

    Observation ``b`` of a draw gets its own stream: rows ``[k * BLOCK, (k + 1) * BLOCK)`` come from a
    generator seeded with the ``k``-th seed of stream ``b`` of one root seed, which is drawn from the
    caller's generator. Chunking over samples or observations (``max_batch_elements``) then only
    decides which blocks are computed together.
    """

    BLOCK = 1024

    def __init__(self, generator: torch.Generator, n: int, base: torch.nn.Module, device: torch.device):
        self.root = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        self.blocks = -(-n // self.BLOCK)
        self.base, self.device = base, device
        self._seeds: dict[int, np.ndarray] = {}

    def rows(self, start: int, m: int, observations: Iterable[int]) -> Tensor:
        """Noise for rows ``[start, start + m)`` of the given observations: ``(m, len(observations), D)``.

        Rows past the ``n`` of the constructor continue each observation's stream (for rejection).
        """
        first, last = start // self.BLOCK, (start + m - 1) // self.BLOCK
        offset = start - first * self.BLOCK
        columns = []
        for b in observations:
            seeds = self._seeds.pop(b, None)
            if seeds is None or len(seeds) <= last:
                seeds = stream_seeds(self.root, f"posterior/{b}", max(self.blocks, last + 1))
            if last + 1 < self.blocks:
                self._seeds[b] = seeds  # later rows of this observation come in another chunk
            blocks = [
                self.base.sample((self.BLOCK,), generator=torch.Generator(device=self.device).manual_seed(int(seeds[k])))
                for k in range(first, last + 1)
            ]
            columns.append(torch.cat(blocks)[offset : offset + m])
        return torch.stack(columns, 1)

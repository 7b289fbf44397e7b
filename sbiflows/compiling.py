"""Training steps compiled with ``torch.compile``: a third of eager's time a step, at a one-time cost.

A training step of a small flow costs what its many small operations' fixed costs add up to (the
spline's ~60 operations forward and ~100 autograd nodes backward). ``torch.compile`` (inductor: on
the CPU, C++ kernels built with the machine's compiler) fuses them, forward and backward, into a few
kernels. :func:`compiled_objective` wraps a training objective so:

* shapes are static (``dynamic=False``): a graph per batch size, with no symbolic-shape work per
  step. Only full batches run compiled; the smaller last batch of an epoch runs eagerly, so an epoch
  needs one graph (one compile) instead of two;
* inductor writes its wrapper code in C++ (``cpp_wrapper``), which cuts the Python work per step;
* a failure to compile (no C++ compiler, an operation inductor cannot handle) warns once and the
  training goes on eagerly: compiling never costs a user a fit.

The compile is slow the first time a machine sees a network and batch size (about 30 s for the
default two_moons network) and fast afterwards (inductor's cache on disk, ``TORCHINDUCTOR_CACHE_DIR``,
by default under the system's temporary folder); docs/benchmarks.md has the measurements. Compiled
kernels round differently from eager ones (float32), so a compiled fit trains to slightly different
weights than an eager one; the same compiled fit made again trains to the same weights.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.distributions import Distribution

__all__ = ["COMPILE_OPTIONS", "CompiledObjective", "compiled_objective"]

#: Inductor options for a training step (see the module docstring).
COMPILE_OPTIONS = {"cpp_wrapper": True}


class CompiledObjective:
    """A loss function whose last argument holds the rows of a batch (``rows.shape[-1]`` of them: e.g.
    ``(model, inputs, context, rows) -> loss``, or an ensemble's stacked ``(inputs, context, rows)`` with
    ``rows`` of shape ``(members, b)``), compiled for batches of ``batch_size`` rows.

    Calls with another number of rows (the last batch of an epoch) and every call after a failed compile
    run ``objective`` itself.

    Args:
        objective: The loss function to compile.
        batch_size: The rows of a full batch: the one batch shape compiled.

    Attributes:
        failed: The error that stopped compiling (the training then runs eagerly), or None.
    """

    def __init__(self, objective: Callable[..., torch.Tensor], *, batch_size: int):
        self.objective = objective
        self.batch_size = batch_size
        self.failed: BaseException | None = None
        self._warm = False  # True once the first compiled call returned
        with _validation_as_dynamo_sets_it():  # torch.compile turns it off on a process's first call
            self._compiled = torch.compile(objective, dynamic=False, options=dict(COMPILE_OPTIONS))

    def __call__(self, *args: Any) -> torch.Tensor:
        if self.failed is None and args[-1].shape[-1] == self.batch_size:  # the rows: full batches only
            try:
                with _validation_as_dynamo_sets_it():
                    if self._warm:
                        return self._compiled(*args)
                    with warnings.catch_warnings():  # torch's deprecation notices while it compiles: not the user's
                        warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*")
                        loss = self._compiled(*args)
                self._warm = True
                return loss
            except Exception as error:  # noqa: BLE001 - any compile failure: go on eagerly, never lose the fit
                self.failed = error
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                warnings.warn(f"could not compile the training step ({type(error).__name__}: {first_line:.200}); "
                              "training goes on without compiling", RuntimeWarning, stacklevel=2)
        return self.objective(*args)


@contextlib.contextmanager
def _validation_as_dynamo_sets_it() -> Iterator[None]:
    """Keep the user's ``torch.distributions`` argument validation outside compiled calls.

    A process's first ``torch.compile(...)`` turns validation off for the whole process, for good (dynamo's
    ``TorchPatcher``, so that tracing meets no checks). Inside this context (that call, and every compiled
    call) validation is off, as dynamo expects; on leaving it, the setting from before is back, so
    ``fit(compile=True)`` leaves the user's distributions validating as they did.
    """
    before = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(before)


def compiled_objective(objective: Callable[..., torch.Tensor], *, batch_size: int, enabled: bool
                       ) -> Callable[..., torch.Tensor]:
    """``objective`` compiled for full batches (:class:`CompiledObjective`) if ``enabled``, else itself.

    Example:
        >>> from sbiflows.training import negative_log_likelihood
        >>> compiled_objective(negative_log_likelihood, batch_size=64, enabled=False) is negative_log_likelihood
        True
    """
    return CompiledObjective(objective, batch_size=batch_size) if enabled else objective

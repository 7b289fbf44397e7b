"""A model's trainable parameters and their gradients as views of flat buffers, one per device and dtype.

A flow has many small parameter tensors (the default NPE network on two parameters has 30), and on
small batches a training step costs what its operations' fixed costs add up to. With the parameters
and gradients as views of one buffer, Adam's update, the gradient clipping and the zeroing each act on
one tensor instead of one per parameter, while the model computes exactly as before (its parameters
keep their shapes and identities; autograd adds each gradient into its view in place).
docs/benchmarks.md, "Flat parameter buffers", has the measured saving.

The optimizer sees only the flat tensors, so its state dict is converted to and from the layout an
optimizer over the separate parameters has (:meth:`FlatParameters.optimizer_state_dict`,
:meth:`FlatParameters.load_optimizer_state_dict`): checkpoints keep one format whichever way they were
written.

Example:
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    >>> flat = FlatParameters(list(model.parameters()))
    >>> [tuple(p.shape) for p in flat.flat]
    [(13,)]
    >>> optimizer = torch.optim.Adam(flat.flat, lr=1e-2)
    >>> model(torch.randn(4, 2)).sum().backward()
    >>> bool(flat.flat[0].grad.abs().sum() > 0)  # the gradients are in the flat buffer
    True
    >>> optimizer.step(); optimizer.zero_grad(set_to_none=False)
    >>> sorted(flat.optimizer_state_dict(optimizer)["state"])  # one entry per parameter of the model
    [0, 1, 2, 3]
    >>> flat.release()  # each parameter gets its own storage back
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


class FlatParameters:
    """Make ``params`` views of flat buffers (one per device and dtype) and their ``.grad`` views of flat gradients.

    The values are copied in, so the model computes the same. Give the optimizer :attr:`flat` instead of
    ``params``, zero gradients with ``set_to_none=False`` and call :meth:`release` when training ends.
    Whatever gives a parameter a new ``.grad`` tensor (``model.zero_grad()``'s default ``set_to_none``,
    ``backward(create_graph=True)``) or new storage (``load_state_dict`` under torch's
    ``set_swap_module_params_on_conversion(True)``) detaches it from the buffers: :meth:`reattach` after
    such a call. Every parameter takes part in the update, so one that gets no gradient in a step is
    still moved by Adam's momentum and weight decay (an optimizer over the separate parameters skips it).

    Args:
        params: The trainable parameters (leaf tensors), each at most once.

    Raises:
        ValueError: If a parameter appears twice.
    """

    def __init__(self, params: Sequence[Tensor]):
        self.params = list(params)
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("params must not repeat a parameter (a tied weight is one parameter)")
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self.params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        #: One flat tensor per device and dtype, in order of first appearance; what the optimizer updates.
        self.flat: list[nn.Parameter] = []
        self._members: list[list[int]] = list(groups.values())
        self._slots: list[tuple[int, slice]] = [(0, slice(0))] * len(self.params)  # per parameter: buffer, elements
        with torch.no_grad():
            for g, members in enumerate(self._members):
                flat = nn.Parameter(torch.cat([self.params[i].detach().reshape(-1) for i in members]),
                                    requires_grad=False)  # autograd never sees it: the views collect the gradients
                flat.grad = torch.zeros_like(flat)
                self.flat.append(flat)
                offset = 0
                for i in members:
                    self._slots[i] = (g, slice(offset, offset + self.params[i].numel()))
                    offset += self.params[i].numel()
                    self.params[i].data, self.params[i].grad = self._views(i)

    @torch.no_grad()
    def reattach(self) -> int:
        """Make parameters that lost their views of the buffers views again, with their current values (a
        detached gradient is dropped: the next step zeroes it anyway). Returns how many were reattached."""
        reattached = 0
        for i, p in enumerate(self.params):
            data, grad = self._views(i)
            if p.data_ptr() != data.data_ptr() or p.grad is None or p.grad.data_ptr() != grad.data_ptr():
                data.copy_(p.detach())
                p.data, p.grad = data, grad
                reattached += 1
        return reattached

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zero the flat gradients: ``optimizer.zero_grad(set_to_none=False)`` without the optimizer's Python
        bookkeeping, which a training step on a small batch notices."""
        for flat in self.flat:
            flat.grad.zero_()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale the gradients to a total 2-norm of at most ``max_norm`` and return the norm before: the
        operations of ``torch.nn.utils.clip_grad_norm_(self.flat, max_norm)``, so the same values, without
        its layers of Python (a seventh of a two_moons step at 60 rows went to them and :meth:`zero_grad`).

        Example:
            >>> layer = nn.Linear(2, 1)
            >>> flat = FlatParameters(list(layer.parameters()))
            >>> layer(torch.ones(1, 2)).sum().mul(100).backward()
            >>> float(flat.clip_grad_norm_(1.0)) > 1, round(float(flat.flat[0].grad.norm()), 4)
            (True, 1.0)
        """
        grads = [flat.grad for flat in self.flat]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(coefficient)
        return total

    def _views(self, i: int) -> tuple[Tensor, Tensor]:
        """Parameter ``i``'s values and gradient: views of its flat buffer and gradient, in its shape."""
        g, elements = self._slots[i]
        shape = self.params[i].shape
        return self.flat[g].data[elements].view(shape), self.flat[g].grad[elements].view(shape)

    def release(self) -> None:
        """Give every parameter its own storage again (its current values) and no gradient."""
        with torch.no_grad():
            for p in self.params:
                p.data = p.data.clone()
                p.grad = None

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` (an optimizer over :attr:`flat`) as an optimizer over the separate
        parameters would have it, in the order of ``params``: per-element state split into their shapes,
        Adam's step count (one per tensor) repeated."""
        state = optimizer.state_dict()
        if len(state["param_groups"]) != 1:
            raise ValueError(f"the optimizer must have one parameter group, got {len(state['param_groups'])}")
        per_parameter: dict[int, dict[str, Any]] = {}
        for i, (g, elements) in enumerate(self._slots):
            entry = state["state"].get(g)
            if entry is not None:
                per_parameter[i] = {name: value[elements].view(self.params[i].shape).clone()
                                    if self._per_element(name, value, self.flat[g])
                                    else value.clone() if isinstance(value, Tensor) else value
                                    for name, value in entry.items()}
        group = {**state["param_groups"][0], "params": list(range(len(self.params)))}
        return {"state": per_parameter, "param_groups": [group]}

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load ``state`` (the layout of :meth:`optimizer_state_dict`) into ``optimizer``, an optimizer over
        :attr:`flat`: per-element state is joined (zeros for a parameter without state), Adam's step count is
        the group's largest.

        Raises:
            ValueError: If ``state`` does not describe one group of exactly the parameters ``params``.
        """
        groups = state["param_groups"]
        if len(groups) != 1 or list(groups[0]["params"]) != list(range(len(self.params))):
            raise ValueError(f"state must describe one group of the {len(self.params)} parameters, got groups of "
                             f"{[len(group['params']) for group in groups]}")
        flat_state: dict[int, dict[str, Any]] = {}
        for g, members in enumerate(self._members):
            present = [(i, state["state"][i]) for i in members if i in state["state"]]
            if not present:
                continue  # no step taken yet
            # A parameter without state never had a gradient (an optimizer over the separate parameters skips
            # it): its moments are zero, as they would be here; the count is the group's largest.
            i0, entry0 = present[0]
            flat_state[g] = {}
            for name, value in entry0.items():
                if self._per_element(name, value, self.params[i0]):
                    parts = [state["state"][i][name] if i in state["state"]
                             else torch.zeros_like(self.params[i], dtype=value.dtype, device=value.device)
                             for i in members]
                    flat_state[g][name] = torch.cat([part.reshape(-1) for part in parts])
                elif name == "step":
                    step = max((entry[name] for _, entry in present), key=float)
                    flat_state[g][name] = step.clone() if isinstance(step, Tensor) else step
                else:
                    flat_state[g][name] = value.clone() if isinstance(value, Tensor) else value  # never shared
        optimizer.load_state_dict({"state": flat_state,
                                   "param_groups": [{**groups[0], "params": list(range(len(self.flat)))}]})

    @staticmethod
    def _per_element(name: str, value: Any, like: Tensor) -> bool:
        """Whether an optimizer state entry holds one value per element of ``like`` (Adam's moments), not one
        value for the whole tensor (its ``step``, a scalar even for a one-element parameter)."""
        return name != "step" and isinstance(value, Tensor) and value.shape == like.shape


class PerParameterState:
    """An optimizer over :attr:`FlatParameters.flat` whose state dict has the layout of an optimizer over the
    separate parameters: what :func:`~sbiflows.checkpoint.loop_state` saves and
    :func:`~sbiflows.checkpoint.restore_loop` loads, so checkpoints keep one format.

    Args:
        flat: The flat parameters.
        optimizer: An optimizer over ``flat.flat``.
    """

    def __init__(self, flat: FlatParameters, optimizer: torch.optim.Optimizer):
        self.flat, self.optimizer = flat, optimizer

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict, per parameter."""
        return self.flat.optimizer_state_dict(self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state dict of the per-parameter layout."""
        self.flat.load_optimizer_state_dict(self.optimizer, state)

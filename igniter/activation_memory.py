"""How many bytes of activations a step keeps for its backward pass, with and without activation checkpointing.

:class:`ActivationMeter` measures one real forward pass (``igniter check`` runs one training
step inside it) with ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves
for the backward pass is seen once, counted by its storage (views of one storage count once),
parameters left out (they are not activations). Tensors saved inside the modules that
``trainer.activation_checkpointing`` names are counted per module, so one pass of the plain
model gives both figures:

* without checkpointing: every saved byte;
* with checkpointing: what is saved outside the checkpointed modules, plus their inputs (kept
  to recompute them), plus the largest checkpointed module's own saved bytes (recomputed one
  module at a time in the backward pass). An estimate of the peak: it leaves out temporaries
  that are never saved (the same with and without) and the recomputation's own workspace.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.utils._pytree import tree_leaves

__all__ = ["ActivationMeter"]


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    """``(data pointer, bytes)`` of ``t``'s storage, ``None`` for a tensor without one."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # sparse, nested or fake tensors
        return None


class ActivationMeter:
    """Inside ``with meter:``, the bytes autograd saves for the backward pass, split by module.

    Args:
        model: the model whose parameters are left out of the count (built without checkpoint
            wrappers: a wrapper's own saved tensors are not seen from outside).
        modules: the modules activation checkpointing would recompute (not nested in each other).

    After the ``with`` block: :attr:`without` and :attr:`with_checkpointing` (bytes, see the
    module docstring). ``micro_batches``: divide both by this many forward passes of equal size
    (gradient accumulation: each micro-batch's backward frees its activations before the next).
    """

    def __init__(self, model: torch.nn.Module, modules: Iterable[torch.nn.Module] = ()) -> None:
        self.modules = list(modules)
        self.parameters = {s[0] for p in model.parameters() if (s := _storage(p)) is not None}
        self.micro_batches = 1
        self._outside: dict[int, int] = {}
        self._inside: dict[int, dict[int, int]] = {}  # module id -> storage -> bytes
        self._inputs: dict[int, int] = {}
        self._active: list[int] = []
        self._handles: list[Any] = []
        self._hooks: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = _storage(t)
        if storage is not None and storage[0] not in self.parameters:
            where = self._inside.setdefault(self._active[-1], {}) if self._active else self._outside
            where[storage[0]] = storage[1]
        return t

    def _enter(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        if not self._active:  # the inputs of an outermost checkpointed module stay alive for its recomputation
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and (s := _storage(leaf)) is not None and s[0] not in self.parameters:
                    self._inputs[s[0]] = s[1]
        self._active.append(id(module))

    def _leave(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self._active and self._active[-1] == id(module):
            self._active.pop()

    def __enter__(self) -> "ActivationMeter":
        for m in self.modules:
            self._handles.append(m.register_forward_pre_hook(self._enter, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._leave, with_kwargs=True))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def without(self) -> int:
        """Bytes saved for the backward pass of one forward pass (every module's activations kept)."""
        sizes = dict(self._outside)
        for inside in self._inside.values():
            sizes.update(inside)
        return sum(sizes.values()) // self.micro_batches

    @property
    def with_checkpointing(self) -> int:
        """Estimated peak bytes of saved activations with the modules checkpointed."""
        inputs = sum(b for s, b in self._inputs.items() if s not in self._outside)
        largest = max((sum(inside.values()) for inside in self._inside.values()), default=0)
        return (sum(self._outside.values()) + inputs + largest) // self.micro_batches

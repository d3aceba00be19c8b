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

:func:`memory_headroom` says how many more bytes this process may allocate (``igniter check``
compares the activations a step would save with it before running the step).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.utils._pytree import tree_leaves

__all__ = ["ActivationMeter", "memory_headroom"]


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
    Storages are told apart by address within one call of ``model`` (a forward pre-hook counts
    the calls): the allocator hands a freed micro-batch's addresses to the next one, whose
    tensors are other tensors all the same.
    """

    def __init__(self, model: torch.nn.Module, modules: Iterable[torch.nn.Module] = ()) -> None:
        self.model = model
        self.modules = list(modules)
        self._pass = 0  # calls of the model so far: a storage is (pass, address)
        self.parameters = {s[0] for p in model.parameters() if (s := _storage(p)) is not None}
        self.micro_batches = 1
        self._outside: dict[tuple[int, int], int] = {}
        self._inside: dict[int, dict[tuple[int, int], int]] = {}  # module id -> storage -> bytes
        self._inputs: dict[tuple[int, int], int] = {}
        self._active: list[int] = []
        self._handles: list[Any] = []
        self._hooks: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = _storage(t)
        if storage is not None and storage[0] not in self.parameters:
            where = self._inside.setdefault(self._active[-1], {}) if self._active else self._outside
            where[(self._pass, storage[0])] = storage[1]
        return t

    def _next_pass(self, *_: Any) -> None:
        self._pass += 1

    def _enter(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        if not self._active:  # the inputs of an outermost checkpointed module stay alive for its recomputation
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and (s := _storage(leaf)) is not None and s[0] not in self.parameters:
                    self._inputs[(self._pass, s[0])] = s[1]
        self._active.append(id(module))

    def _leave(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self._active and self._active[-1] == id(module):
            self._active.pop()

    def __enter__(self) -> "ActivationMeter":
        self._handles.append(self.model.register_forward_pre_hook(self._next_pass))
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


_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def _kib_field(path: str, name: str) -> int | None:
    """``name:   N kB`` of a ``/proc`` file, in bytes (``None`` where there is no such file or field)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under the memory limit of this process's cgroup and of every cgroup above it
    (v2: ``memory.max - memory.current``; v1: ``memory.limit_in_bytes - memory.usage_in_bytes``),
    the smallest; inactive file cache (``memory.stat``), which the kernel reclaims before it
    kills, is not counted as used. ``None`` where no limit is set."""
    dirs: list[Path] = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):  # v2; in a cgroup namespace the path is "/" and the mount root is ours
                d = root / line[3:].strip().strip("/")
                dirs += [d, *(p for p in d.parents if p == root or root in p.parents)]
    except OSError:
        pass
    files = [(d, "memory.max", "memory.current", "inactive_file") for d in dict.fromkeys([*dirs, root])]
    files.append((root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))
    left = []
    for d, limit_file, used_file, inactive in files:
        try:
            text, used = (d / limit_file).read_text().strip(), int((d / used_file).read_text())
            limit = _NO_LIMIT if text == "max" else int(text)
        except (OSError, ValueError):
            continue
        if limit < _NO_LIMIT:
            left.append(max(0, limit - used + (_stat_field(d / "memory.stat", inactive) or 0)))
    return min(left, default=None)


def _stat_field(path: Path, name: str) -> int | None:
    """``name N`` (bytes) of a cgroup ``memory.stat``; ``None`` where absent."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def memory_headroom(device: torch.device) -> tuple[int, str] | None:
    """How many more bytes this process may allocate on ``device``, and what bounds it.

    CUDA: the device's free memory (``torch.cuda.mem_get_info``) plus what PyTorch's caching
    allocator holds reserved but unused. CPU: the smallest of ``MemAvailable`` (``/proc/meminfo``),
    the room left under a cgroup memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``,
    of this process's cgroup or one above it; reclaimable file cache not counted as used) and
    the room left under ``RLIMIT_AS`` (its soft limit less the process's ``VmSize``), each where
    set.

    Returns:
        ``(bytes, name of the bound)``, e.g. ``(21_600_000_000, "MemAvailable")``; ``None`` where
        nothing can be read (a system without ``/proc``, another device type).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free memory of {device}"
    if device.type != "cpu":
        return None
    bounds: dict[str, int | None] = {
        "MemAvailable": _kib_field("/proc/meminfo", "MemAvailable"),
        "the cgroup memory limit": _cgroup_headroom(),
    }
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    size = _kib_field(f"/proc/{os.getpid()}/status", "VmSize")
    if soft != resource.RLIM_INFINITY and size is not None:
        bounds["RLIMIT_AS"] = max(0, soft - size)
    known = [(v, name) for name, v in bounds.items() if v is not None]
    return min(known) if known else None

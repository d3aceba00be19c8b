"""``trainer.compile``: ``torch.compile`` from config, checked before anything runs.

``false`` (default): eager. ``true``: ``torch.compile(model)`` with PyTorch's defaults
(the ``inductor`` backend). A mapping: its keys ``mode``, ``backend``, ``fullgraph``,
``dynamic`` and ``options`` are passed to ``torch.compile``. The model is compiled
before it is wrapped for DDP (:func:`igniter.parallel.strategy.wrap_model`) and
checkpoints hold the original module's ``state_dict`` (no ``_orig_mod.`` prefixes), so
a compiled run resumes an eager one and the other way round.

Compilation happens at the first call (training step, then again for evaluation, which
runs the model in eval mode); :func:`compile_time_s` reports the seconds it took.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from igniter.errors import Problem

__all__ = ["COMPILE_KEYS", "compile_options", "compile_problems", "compile_time_s"]

#: Keys of a ``trainer.compile`` mapping: ``torch.compile``'s keyword arguments.
COMPILE_KEYS = ("mode", "backend", "fullgraph", "dynamic", "options")
_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(value: Any) -> dict[str, Any] | None:
    """``trainer.compile`` -> keyword arguments of ``torch.compile``, or ``None`` (eager).

    Args:
        value: ``False``/``None``, ``True``, or a mapping with keys in :data:`COMPILE_KEYS`
            (``null`` entries are dropped, so PyTorch's defaults apply).
    """
    if value is None or value is False:
        return None
    if value is True:
        return {}
    return {k: v for k, v in dict(value).items() if v is not None}


def compile_problems(value: Any, cuda_here: bool | None) -> list[Problem]:
    """Problems with ``trainer.compile``: its type, keys, ``mode`` and ``backend``, and, for
    the ``inductor`` backend on a CPU run, a missing C++ compiler (inductor builds C++
    kernels on CPU; without one the first step would fail deep inside ``torch._inductor``).

    Args:
        value: the configured value.
        cuda_here: whether the run's processes will have CUDA (``None``: unknown, the job
            runs on another machine: the compiler is not checked here).
    """
    if not (value is None or isinstance(value, bool) or isinstance(value, Mapping) or hasattr(value, "keys")):
        return [
            Problem(
                "trainer.compile",
                "expected false, true or a mapping of torch.compile arguments (mode, backend, fullgraph, dynamic, options)",
                value,
            )
        ]
    options = compile_options(value)
    if options is None:
        return []
    problems = [
        Problem(
            f"trainer.compile.{k}",
            f"not an argument of torch.compile (accepted: {', '.join(COMPILE_KEYS)})",
            options[k],
        )
        for k in options
        if k not in COMPILE_KEYS
    ]
    if "mode" in options and options["mode"] not in _MODES:
        problems.append(Problem("trainer.compile.mode", f"expected one of {', '.join(_MODES)}", options["mode"]))
    backend = options.get("backend", "inductor")
    if not isinstance(backend, str) or backend not in torch.compiler.list_backends(exclude_tags=()):
        known = ", ".join(torch.compiler.list_backends())
        return problems + [
            Problem(
                "trainer.compile.backend",
                f"not a torch.compile backend (torch.compiler.list_backends(): {known}, and eager, aot_eager for debugging)",
                backend,
            )
        ]
    if backend == "inductor" and cuda_here is False:
        problems += _cxx_problems()
    return problems


def _cxx_problems() -> list[Problem]:
    """A problem when inductor finds no C++ compiler (it looks at ``$CXX``, then ``g++``)."""
    from torch._inductor import cpp_builder  # imported only when compiling on CPU: ~0.5 s

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as e:  # torch._inductor.exc.InvalidCxxCompiler
        return [
            Problem(
                "trainer.compile",
                f"torch.compile's inductor backend needs a C++ compiler on a CPU run and found none ({e}); "
                "install one (`apt-get install g++`), set CXX to its path, or use trainer.compile.backend=aot_eager",
            )
        ]
    return []


def compile_time_s() -> float | None:
    """Seconds this process has spent in ``torch.compile`` so far (TorchDynamo's own
    accounting, ``torch._dynamo.utils.calculate_time_spent()["total_wall_time"]``), or
    ``None`` when that private helper is unavailable."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent().get("total_wall_time", 0.0))
    except Exception:  # a PyTorch without the helper: the summary leaves the line out
        return None

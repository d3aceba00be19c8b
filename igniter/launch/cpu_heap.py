"""How much freed memory each process keeps for reuse instead of handing it back to the OS.

glibc's ``malloc`` returns the free top of its heap to the OS (``brk``) whenever it grows
past a *trim threshold*, and serves blocks above an *mmap threshold* with a fresh ``mmap``
each time. By default both adapt to the largest block freed so far (``mallopt(3)``,
``M_TRIM_THRESHOLD`` and ``M_MMAP_THRESHOLD``), so whether a training step's freed
activations stay with the process depends on what the process happened to free before.
When they do not, every iteration gives them back at its end and page-faults them in
again during the next one. Measured on the reference LM recipe (``bench/lm.py``, one
process, bf16, 2026-12-06): each iteration handed back about 15 MB, 3,700 extra page faults
per iteration, 42-58 ms per iteration against 37 ms with the memory kept; a hand-written
loop of the same step, in a process of its own, happened to keep it (37 ms, and 0 to a few
hundred page faults per iteration from run to run).

Every process of a run therefore fixes both before it builds anything
(:func:`keep_freed_memory`, called beside the thread count in
:func:`igniter.launch.runners._call`): blocks up to 32 MiB come from the heap (glibc's own
ceiling for the adaptive threshold) and up to ``runner.malloc_trim_threshold_mb`` of free
heap stays with the process (default 1024 MiB). Loader workers it forks inherit the setting
(glibc's state is copied with the process); workers of a ``spawn`` context keep glibc's
default. The cost is resident memory: a process
keeps up to that much freed memory until it allocates again. PyTorch's CPU launcher
(``torch.backends.xeon.run_cpu``) goes further in the same direction: it preloads tcmalloc or
jemalloc, which keep freed pages for reuse and hand them back slowly.
``null`` keeps glibc's adaptive behaviour. Nothing is changed where the C library is not
glibc or the user set ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_`` or a
``glibc.malloc`` tunable in ``GLIBC_TUNABLES``: theirs is kept.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["MMAP_THRESHOLD_BYTES", "keep_freed_memory", "user_malloc_settings"]

#: glibc's ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc's ``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit: the adaptive threshold's ceiling and the
#: largest value ``mallopt(M_MMAP_THRESHOLD)`` accepts.
MMAP_THRESHOLD_BYTES = 32 * 2**20


def user_malloc_settings() -> list[str]:
    """The environment variables by which the user already tuned glibc's malloc thresholds."""
    names = [name for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_") if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        names.append("GLIBC_TUNABLES")
    return names


def keep_freed_memory(trim_threshold_mb: float | None) -> bool:
    """Make this process keep up to ``trim_threshold_mb`` MiB of freed heap for reuse and serve
    blocks up to 32 MiB from the heap (see the module docstring).

    Args:
        trim_threshold_mb: ``runner.malloc_trim_threshold_mb`` in MiB (0 < value < 2048, a C
            ``int`` of bytes); ``None`` leaves glibc's adaptive thresholds alone.

    Returns:
        Whether the thresholds were set: ``False`` for ``None``, a C library other than
        glibc, or thresholds the user set in the environment.
    """
    if trim_threshold_mb is None or platform.libc_ver()[0] != "glibc" or user_malloc_settings():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: setting either one stops glibc adapting both.
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold_mb * 2**20))
    )

"""Keep freed memory in a CPU training process instead of handing it back to the OS.

glibc's malloc serves large blocks (above a threshold that it adapts up to 32 MiB) with fresh
``mmap`` pages and gives freed memory at the top of the heap back to the OS once more than twice
that threshold is free. A CPU training step allocates and frees the same large tensors every step
(activations, attention maps: 8.6 MiB per layer for the default teacher at batch 64), so the
process takes a page fault on every 4 KiB of them, every step: 7,500-19,000 faults per forward
of the default teacher at batch 64 were counted here (``tests/test_cpu_allocator.py`` counts them),
several milliseconds of a ~70 ms step. Distillation methods that keep the teacher's attention maps
alive across layers pay it more (the maps cannot reuse each other's memory).

:func:`retain_freed_memory` sets ``M_MMAP_THRESHOLD`` to 32 MiB (its maximum) and
``M_TRIM_THRESHOLD`` to 1 GiB with ``mallopt``: blocks up to 32 MiB then come from the heap and
freed ones are reused. The cost is that the process keeps its peak heap (it is not returned to
the OS), the same trade a GPU caching allocator makes. PyTorch's CPU performance guide reaches the
same end by preloading jemalloc or tcmalloc; this needs no extra library.

Called by the training workers (``scaling.retain_freed_memory``, default on) and by
``benchmarks/loss_overhead.py``. A no-op, with the reason returned, off glibc or when
``AMAD_RETAIN_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "retain_freed_memory"]

# mallopt parameter numbers, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 2**30

_applied: str | None = None


def retain_freed_memory() -> tuple[bool, str]:
    """Apply the settings to this process (idempotent). Returns ``(applied, what happened)``."""
    global _applied
    if _applied is not None:
        return True, _applied
    if os.environ.get("AMAD_RETAIN_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return False, "turned off by AMAD_RETAIN_FREED_MEMORY=0"
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return False, f"not glibc ({libc_name or platform.system()}): the system allocator is left as it is"
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:
        return False, f"mallopt unavailable: {exc}"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) or not mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        return False, "mallopt refused the thresholds"
    _applied = f"glibc malloc: mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
    return True, _applied

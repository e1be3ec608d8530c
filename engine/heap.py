"""Handing freed memory back to the OS (glibc only; elsewhere a no-op)."""
from __future__ import annotations

import ctypes
import functools
import gc


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc's, absent from other C libraries (AttributeError)
        return libc
    except (OSError, AttributeError):
        return None


# glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so after the first
# prefill step its scratch (tens of MB) comes from the arenas and stays in the RSS between steps, beside
# the KV cache. Fixed at 1 MiB, blocks that large are mapped and unmapped: a prefill step's few page
# faults per MB cost well under 1% of its time, and decode steps allocate nothing that large.
_MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


@functools.cache
def cap_mmap_threshold() -> None:
    """Serve allocations of 1 MiB or more from their own mappings for the rest of the process (once)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def trim_heap() -> None:
    """Return the free pages of glibc's arenas to the OS. Freed blocks stay in the arenas, so the
    scratch of packing one tensor (file reads, dequantized rows) would stay in the process's RSS and
    pile up between the packed tensors that are kept."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def release_free_heap() -> None:
    """Collect garbage, then `trim_heap`: after a model is built, the checkpoint's and the dropped
    copies' pages leave the RSS."""
    gc.collect()
    trim_heap()

"""Handing freed memory back to the OS while a model is built (glibc only; elsewhere a no-op)."""
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

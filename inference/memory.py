"""Giving memory back to the operating system between batches.

glibc's allocator keeps what a process frees for its next allocations; the arrays of a batch
(films' pixels, activations, overlays) leave holes in its heaps that later batches do not fill
exactly, so a long run's resident memory creeps up by a batch or more. ``malloc_trim`` returns
those free pages (about 70 MB after a batch of eight 1024 px films). Elsewhere (macOS, musl) it
does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Return the allocator's free pages to the operating system (glibc only; a few ms)."""
    if _TRIM is not None:
        _TRIM(0)

"""Keeping a long run's resident memory flat (glibc, oneDNN).

glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), so after a few
steps the 1-8 MiB activations of a CPU training step and the decoded images of the collator come
from the heap, whose freed pages it keeps and fragments. Measured on the tiny preset, 300 steps
(`benchmarks/bench_at_scale.py` data, 0 workers): the anonymous RSS grew 479 -> 674 MiB with nothing
leaking; with the threshold fixed at 1 MiB it stayed at 402 -> 449 MiB, the run 5% slower (77.6 ->
81.6 s). `fix_mmap_threshold` fixes it (the training CLI calls it at start; DataLoader workers inherit
it), and the trainer's `ReleaseFreedHeapCallback` returns the heap's freed pages every `HEAP_TRIM_STEPS` steps.
Elsewhere (macOS, musl) both do nothing.

What grew after that was oneDNN's primitive cache (1,024 kernels by default, each with its scratch
memory): packed captions give the text tower new shapes every step. With 2 DataLoader workers over
600 steps the training process grew 403 -> 469 MiB; with the cache at 8 primitives 379 -> 388 MiB,
no slower (most shapes are new each step anyway). `limit_onednn_primitive_cache` sets it before
oneDNN first builds a kernel (a `ONEDNN_PRIMITIVE_CACHE_CAPACITY` set by the user wins).
"""

import ctypes
import ctypes.util
import functools
import os
from typing import Any

__all__ = ["HEAP_TRIM_STEPS", "MMAP_THRESHOLD_BYTES", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "fix_mmap_threshold",
           "limit_onednn_primitive_cache", "release_free_heap"]

HEAP_TRIM_STEPS = 50
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
ONEDNN_PRIMITIVE_CACHE_CAPACITY = 8


@functools.cache
def _glibc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Blocks of at least `nbytes` are mapped, and unmapped when freed, for the rest of the process
    (this also stops glibc's dynamic threshold). A `MALLOC_MMAP_THRESHOLD_` set by the user wins.
    Returns whether the threshold was set here."""
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes))


def release_free_heap() -> bool:
    """glibc `malloc_trim(0)`: hand freed heap pages back; False without glibc or when none was freed."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def limit_onednn_primitive_cache(capacity: int = ONEDNN_PRIMITIVE_CACHE_CAPACITY) -> bool:
    """Cap oneDNN's primitive cache at `capacity` kernels; effective only before the process's first
    oneDNN kernel (oneDNN reads the variable once). Returns whether it was set here."""
    if "ONEDNN_PRIMITIVE_CACHE_CAPACITY" in os.environ:
        return False
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(capacity)
    return True

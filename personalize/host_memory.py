"""Host memory that goes back to the OS: glibc's malloc keeps freed activations.

glibc serves a large allocation with its own mmap, but each time such a block is freed it raises its
mmap threshold to that block's size (up to 32 MB), so that from then on the activations of a step
come from the heap, and the heap keeps what is freed in its middle: the process's resident memory
grows to the sum of a step's largest moments, never to what is live. Fixing the threshold
(mallopt M_MMAP_THRESHOLD, which also turns the dynamic raise off) gives every tensor of 1 MB and
up its own mapping, returned to the OS on free: a bk-sdm-small LoRA step in fp32 at 256 px peaked
0.5 GB lower, for slower steps (page faults on every fresh mapping; benchmarks/RESULTS.md).
No torch here: ctypes only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD_BYTES = 1 << 20  # below the activations of a 256 px step (1-3 MB and up), above small tensors


@functools.cache  # trim runs once per replaced layer (quantize.py): dlopen once
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim() -> bool:
    """Hand the free memory in glibc's heap back to the OS now (malloc_trim(0): the top of the heap,
    and the free pages in its middle). For a one-off release, such as a full-precision weight a
    quantized layer replaced (quantize.py) or the temporary copy of a weight rewritten in place
    (gemm_convs.py), which the heap would otherwise keep for the whole run. True where something was
    released."""
    libc = _libc()
    fn = getattr(libc, "malloc_trim", None) if libc is not None else None
    if fn is None:
        return False
    fn.argtypes, fn.restype = (ctypes.c_size_t,), ctypes.c_int
    return fn(0) == 1


def return_freed_memory(threshold: int = THRESHOLD_BYTES) -> bool:
    """From now on in this process, allocations of `threshold` bytes and up are mmapped and given
    back to the OS when freed. True where it took effect (Linux with glibc), False elsewhere (musl,
    macOS, Windows: their allocators need no help or take no such setting)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1

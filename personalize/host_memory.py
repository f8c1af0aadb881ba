"""Host memory that goes back to the OS: glibc's malloc keeps freed activations.

glibc serves a large allocation with its own mmap, but each time such a block is freed it raises its
mmap threshold to that block's size (up to 32 MB), so that from then on the activations of a step
come from the heap, and the heap keeps what is freed in its middle: the process's resident memory
grows to the sum of a step's largest moments, never to what is live. Fixing the threshold
(mallopt M_MMAP_THRESHOLD, which also turns the dynamic raise off) gives every tensor of 1 MB and
up its own mapping, returned to the OS on free: a bk-sdm-small LoRA step in fp32 at 256 px peaked
0.5 GB lower, for slower steps (page faults on every fresh mapping; benchmarks/RESULTS.md).
The other way round, `reuse_freed_memory` (a run's training block on the CPU, by default): every
allocation from the heap, none mmapped, and nothing trimmed from it, so that the tensors a step frees
serve the next step's, instead of fresh mappings the kernel must fault in and zero page by page (the
weight-sized gradients and bf16 weight casts of a full finetuning run are over the 32 MB the dynamic
threshold reaches). No torch here: ctypes only.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults, restored after the block
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


def _mallopt(*settings: tuple[int, int]) -> bool:
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in settings])


def return_freed_memory(threshold: int = THRESHOLD_BYTES) -> bool:
    """From now on in this process, allocations of `threshold` bytes and up are mmapped and given
    back to the OS when freed. True where it took effect (Linux with glibc), False elsewhere (musl,
    macOS, Windows: their allocators need no help or take no such setting)."""
    return _mallopt((M_MMAP_THRESHOLD, threshold))


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True):
    """Inside the block, glibc serves every allocation from its heap and keeps what is freed there
    (no mmap, no trim); afterwards its default limits are back and the heap is trimmed. Yields whether
    it took effect (glibc only). Measured on a bk-sdm-small run, 256 px, bf16, AMX (`train_speed.py
    --options heap_mmap`, RESULTS.md): full finetuning 2.99 -> 2.42 s/step for +645 MB of peak, LoRA
    within the noise and the same peak."""
    on = enabled and _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
    try:
        yield on
    finally:
        if on:
            _mallopt((M_MMAP_MAX, DEFAULT_MMAP_MAX), (M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD))
            trim()

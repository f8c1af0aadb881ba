"""--release-freed-memory: after `return_freed_memory()`, blocks glibc's heap would have kept are
returned to the OS when freed (checked on the process's resident memory, in a fresh process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# a fresh process: free one 16 MB mmapped block (glibc then raises its mmap threshold to 16 MB), so
# the 4 MB blocks after it come from the heap; free all but the newest (it pins the heap's top, as a
# live tensor does) and read how much of the freed 160 MB is still resident
PROBE = textwrap.dedent("""
    import ctypes, sys
    from personalize.host_memory import return_freed_memory, trim
    took = return_freed_memory() if sys.argv[1] == "on" else None
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    def block(n):
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        return p
    libc.free(block(16 << 20))
    before = rss()
    blocks = [block(4 << 20) for _ in range(41)]
    for p in blocks[:-1]:
        libc.free(p)
    if sys.argv[1] == "trim":
        took = trim()
    print(took, round(rss() - before))
""")


def _kept_mb(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_go_back_to_the_os_only_when_asked():
    took, kept_default = _kept_mb("off")
    assert kept_default >= 150  # glibc's own policy keeps them: what the option is for
    took, kept = _kept_mb("on")
    assert took == "True" and kept <= 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_trim_hands_back_what_the_heap_kept():
    took, kept = _kept_mb("trim")
    assert took == "True" and kept <= 10


# a fresh process: a 64 MB block (over glibc's largest mmap threshold) allocated, written and freed
# three times; the minor page faults of the last two rounds say whether it came back as fresh pages
REUSE = textwrap.dedent("""
    import ctypes, resource, sys
    from personalize.host_memory import reuse_freed_memory
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    def rounds():
        faults = []
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = libc.malloc(64 << 20)
            ctypes.memset(p, 1, 64 << 20)
            libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return sum(faults[1:])
    with reuse_freed_memory(sys.argv[1] == "on") as took:
        inside = rounds()
    after = rounds()
    print(took, inside, after)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_run_s_freed_memory_serves_its_next_allocations_and_is_handed_back_after(mode):
    took, inside, after = subprocess.run([sys.executable, "-c", REUSE, mode], capture_output=True, text=True,
                                         check=True).stdout.split()
    pages = (64 << 20) // 4096
    if mode == "on":
        assert took == "True" and int(inside) < pages // 10  # the heap's pages again: no faults
    else:
        assert took == "False" and int(inside) >= pages  # a fresh mapping each round (2 x 16384 pages)
    assert int(after) >= pages  # afterwards glibc's defaults are back: mmapped and given back

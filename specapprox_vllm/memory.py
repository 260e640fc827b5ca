"""Give freed heap memory back to the OS (glibc ``malloc_trim``).

Why: an engine worker allocates activations of a different size at every step (prompt
lengths and chunked-prefill batches vary). glibc keeps freed chunks in its arenas for reuse,
and with varied sizes that free memory fragments and grows: in a soak the target worker's RSS
climbed 2-4 MB per request although the live Python objects and tensors stayed constant, and
one ``malloc_trim(0)`` returned most of it (docs/reliability.md, "Memory: heap trimming"). Not
a leak, but to an operator or an OOM killer it is indistinguishable from one. (The live growth
that trimming could not undo was oneDNN's primitive cache: see ``server.cli.engine_environment``.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from functools import cache
from typing import Any

import psutil


def _libc_function(name: str) -> Any | None:
    """A function of the C library, or None where it has none (musl, macOS, old glibc)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


@cache
def _malloc_trim() -> Any | None:
    """glibc's ``malloc_trim``, or None."""
    fn = _libc_function("malloc_trim")
    if fn is not None:
        fn.argtypes = [ctypes.c_size_t]
        fn.restype = ctypes.c_int
    return fn


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@cache
def _mallinfo2() -> Any | None:
    """glibc's ``mallinfo2`` (2.33+), or None."""
    fn = _libc_function("mallinfo2")
    if fn is not None:
        fn.argtypes = []
        fn.restype = _Mallinfo2
    return fn


def heap_stats() -> dict[str, int] | None:
    """malloc's own account of this process, summed over its arenas: ``in_use_bytes`` (live
    chunks, heap and mmapped), ``free_bytes`` (free chunks malloc keeps), ``mmapped_bytes``.

    Why: it tells the two kinds of RSS growth apart. Live allocations that pile up (a cache,
    a leak in C code) raise ``in_use_bytes``; fragmentation raises ``free_bytes`` that a trim
    cannot return. None without glibc."""
    fn = _mallinfo2()
    if fn is None:
        return None
    m = fn()
    return {"in_use_bytes": m.uordblks + m.hblkhd, "free_bytes": m.fordblks,
            "mmapped_bytes": m.hblkhd}


def trim_heap() -> dict[str, Any]:
    """Release this process's free heap pages. Returns ``{"supported", "released_bytes",
    "ms", "heap"}``; ``released_bytes`` is the RSS drop it caused (None when unsupported),
    ``heap`` is :func:`heap_stats` after the trim."""
    fn = _malloc_trim()
    if fn is None:
        return {"supported": False, "released_bytes": None, "ms": 0.0, "heap": None}
    proc = psutil.Process()  # the same RSS reading as /specapprox/state's
    before = proc.memory_info().rss
    t0 = time.perf_counter()
    fn(0)
    ms = (time.perf_counter() - t0) * 1e3
    released = max(0, before - proc.memory_info().rss)
    return {"supported": True, "released_bytes": released, "ms": round(ms, 2),
            "heap": heap_stats()}

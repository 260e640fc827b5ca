"""Give freed heap memory back to the OS (glibc ``malloc_trim``).

Why: an engine worker allocates activations of a different size at every step (prompt
lengths and chunked-prefill batches vary). glibc keeps freed chunks in its arenas for reuse,
and with varied sizes that free memory fragments and grows: in a soak the target worker's RSS
climbed 2-4 MB per request although the live Python objects and tensors stayed constant, and
one ``malloc_trim(0)`` returned most of it (docs/reliability.md, "Memory: heap trimming", which
also describes the growth that trimming does not undo). Not a leak, but to an operator or an
OOM killer it is indistinguishable from one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from functools import cache
from typing import Any

import psutil


@cache
def _malloc_trim() -> Any | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim_heap() -> dict[str, Any]:
    """Release this process's free heap pages. Returns ``{"supported", "released_bytes",
    "ms"}``; ``released_bytes`` is the RSS drop it caused (None when unsupported)."""
    fn = _malloc_trim()
    if fn is None:
        return {"supported": False, "released_bytes": None, "ms": 0.0}
    proc = psutil.Process()  # the same RSS reading as /specapprox/state's
    before = proc.memory_info().rss
    t0 = time.perf_counter()
    fn(0)
    ms = (time.perf_counter() - t0) * 1e3
    released = max(0, before - proc.memory_info().rss)
    return {"supported": True, "released_bytes": released, "ms": round(ms, 2)}

"""Heap trimming (``specapprox_vllm/memory.py``, ``server/memory_trim.py``), without engines.

The expectation is independent of the code under test: RSS read from ``/proc/self/status`` by
the child process itself, and fake engines that record the RPCs they receive.
"""

from __future__ import annotations

import ctypes.util
import json
import platform
import subprocess
import sys
from typing import Any

import pytest

from server.memory_trim import MemoryTrimmer
from specapprox_vllm import memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

CHILD = r"""
import json
from specapprox_vllm.memory import trim_heap

def vmrss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

# 2,000 blocks of 100 KB: below glibc's initial mmap threshold, so they come from the heap.
blocks = [bytes(100_000) for _ in range(2000)]
pin = bytes(100_000)  # allocated last: it keeps the top of the heap, so free() cannot shrink it
del blocks
before = vmrss()
out = trim_heap()
print(json.dumps({"before": before, "after": vmrss(), "trim": out}))
"""


def run_child(code: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; its JSON line (the last) on stdout."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ".", **(env or {})})
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_trim_returns_freed_heap_pages_to_the_os() -> None:
    got = run_child(CHILD)
    dropped = got["before"] - got["after"]
    assert got["trim"]["supported"] is True
    assert dropped > 100e6 and got["after"] < got["before"] / 2, got  # of ~200 MB freed
    # What trim_heap reports is what the process sees (pages of 4 KiB, other noise small).
    assert abs(got["trim"]["released_bytes"] - dropped) < 8e6, got


def test_trim_is_a_reported_no_op_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    memory._malloc_trim.cache_clear()
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libnonexistent.so.9")
    try:
        assert memory.trim_heap() == {"supported": False, "released_bytes": None, "ms": 0.0,
                                      "heap": None}
    finally:
        memory._malloc_trim.cache_clear()


HEAP_CHILD = r"""
import json
from specapprox_vllm.memory import heap_stats

before = heap_stats()
live = [bytearray(1_000_000) for _ in range(64)]  # 64 MB that stay alive
during = heap_stats()
del live
print(json.dumps({"before": before, "during": during, "after": heap_stats()}))
"""


@pytest.mark.skipif(not GLIBC, reason="mallinfo2 is glibc's")
def test_heap_stats_count_live_allocations() -> None:
    got = run_child(HEAP_CHILD)
    grew = got["during"]["in_use_bytes"] - got["before"]["in_use_bytes"]
    assert 64e6 <= grew < 66e6, got  # the 64 MB allocated, plus object headers
    assert got["after"]["in_use_bytes"] - got["before"]["in_use_bytes"] < 1e6, got


class FakeEngine:
    def __init__(self, released: int, errored: bool = False, fail: bool = False,
                 workers: int = 1) -> None:
        self.released, self.errored, self.fail = released, errored, fail
        self.workers = workers
        self.calls: list[str] = []

    async def collective_rpc(self, method: str) -> list[dict[str, Any]]:
        self.calls.append(method)
        if self.fail:
            raise RuntimeError("engine gone")
        heap = {"in_use_bytes": 100, "free_bytes": 10, "mmapped_bytes": 1}
        return [{"supported": True, "released_bytes": self.released, "ms": 2.5, "heap": heap}
                for _ in range(self.workers)]


class FakeAdmission:
    active = 0
    queued = 0
    completed = 0


async def test_one_pass_trims_every_live_engine_and_adds_up() -> None:
    target, draft = FakeEngine(15 << 20, workers=2), FakeEngine(5 << 20)
    dead = FakeEngine(1, errored=True)
    t = MemoryTrimmer({"target": target, "draft": draft, "old": dead, "none": None}, 30.0)
    released = await t.trim_once()
    assert target.calls == draft.calls == ["specapprox_trim_memory"] and dead.calls == []
    assert released >= 35 << 20  # plus whatever this process gave back
    d = t.to_dict()
    assert d["runs"] == 1 and d["released_bytes_total"] == released and d["ms_last"] >= 2.5
    assert d["heap"]["target"] == {"in_use_bytes": 200, "free_bytes": 20, "mmapped_bytes": 2}
    assert d["heap"]["draft"]["in_use_bytes"] == 100 and set(d["heap"]) == {
        "api", "target", "draft"}


async def test_a_failing_engine_does_not_stop_the_others(caplog) -> None:
    ok, bad = FakeEngine(7 << 20), FakeEngine(0, fail=True)
    t = MemoryTrimmer({"draft": bad, "target": ok}, 30.0)
    assert await t.trim_once() >= 7 << 20
    assert ok.calls and "memory trim in the draft engine failed" in caplog.text


async def test_due_after_the_interval_or_when_idle_after_serving() -> None:
    adm = FakeAdmission()
    t = MemoryTrimmer({"target": FakeEngine(0)}, 30.0, adm)
    await t.trim_once()
    now = t._last_t
    assert not t.due(now + 1)  # idle, but nothing served since the last trim
    adm.active, adm.completed = 1, 1
    assert not t.due(now + 1)  # busy: wait for the interval
    assert t.due(now + 30)
    adm.active = 0
    assert t.due(now + 1)  # the burst is over
    await t.trim_once()
    assert not t.due(t._last_t + 1)


async def test_trimming_off_means_no_loop() -> None:
    eng = FakeEngine(0)
    await MemoryTrimmer({"target": eng}, None).run()  # returns at once
    assert eng.calls == []


# vLLM's CPU linear layer (oneDNN matmul, the op every engine step runs), called with 300
# distinct batch token counts, as a long mixed workload does: each compiles a primitive.
ONEDNN_CHILD = r"""
import json
import time
import torch
from vllm import _custom_ops as ops
from specapprox_vllm.memory import heap_stats

handler = ops.create_onednn_mm(torch.randn(1536, 576).t(), 32)  # vLLM's own cache: 32
x = torch.randn(400, 576)
for m in range(1, 9):
    ops.onednn_mm(handler, x[:m], None)
before, t0 = heap_stats()["in_use_bytes"], time.perf_counter()
for m in range(9, 309):
    ops.onednn_mm(handler, x[:m], None)
print(json.dumps({"growth": heap_stats()["in_use_bytes"] - before,
                  "seconds": time.perf_counter() - t0}))
"""


@pytest.mark.skipif(not GLIBC, reason="mallinfo2 is glibc's")
def test_engine_environment_bounds_onednn_primitive_memory() -> None:
    """The server's engine environment keeps oneDNN from holding a compiled primitive per
    batch size seen (the target worker's growth in the soak); oneDNN's default does not."""
    from vllm import _custom_ops as ops  # a hard dependency: missing vLLM fails here

    from server.cli import engine_environment

    if not ops._supports_onednn:
        pytest.skip("this vLLM build has no oneDNN matmul (GPU builds)")
    env = engine_environment(exit_on_engine_death=False)
    got, control = run_child(ONEDNN_CHILD, env), run_child(ONEDNN_CHILD)
    ours, default = got["growth"], control["growth"]
    print(f"300 batch sizes: live heap +{ours / 2**20:.1f} MiB in {got['seconds']:.2f} s with "
          f"the engine environment, +{default / 2**20:.1f} MiB in {control['seconds']:.2f} s "
          "with oneDNN's default")  # the figures in docs/reliability.md (pytest -s)
    assert default > 50 * 2**20, default  # the control: 300 cached primitives, ~94 MiB here
    assert ours < 20 * 2**20 and ours < default / 4, (ours, default)  # vLLM's 32 only

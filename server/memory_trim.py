"""Heap trimming in the engine workers and the API process: periodically, and when the server
goes idle.

Why from here, and when: the growth it undoes (``specapprox_vllm/memory.py``) builds up while
the server is busy, so trimming only when idle would let a server under steady load grow
without bound; trimming also as soon as a burst ends leaves an idle server at its floor, which
is what an operator (and the soak's end-state check) reads. A ``collective_rpc`` runs in each
worker between engine steps, so a trim never competes with a forward pass; it takes
milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from specapprox_vllm.memory import trim_heap
from specapprox_vllm.wire import RPC

log = logging.getLogger("specapprox.memory")

TICK_S = 1.0


class MemoryTrimmer:
    """``malloc_trim`` in every live engine's workers and here: every ``interval_s`` while
    busy, and once when the admission state turns idle after serving. ``to_dict`` is the
    ``memory_trim`` part of ``/specapprox/state``."""

    def __init__(self, engines: dict[str, Any], interval_s: float | None,
                 admission: Any = None) -> None:
        self.engines = {k: e for k, e in engines.items() if e is not None}
        self.interval_s = interval_s
        self.admission = admission
        self.runs = 0
        self.released_last = 0
        self.released_total = 0
        self.ms_last = 0.0
        self._last_t = time.monotonic()
        self._completed_at_last = 0
        # malloc's own account after the last trim, per engine (its workers summed) and for
        # this process: live bytes that keep rising are a leak, free bytes fragmentation
        self.heap: dict[str, dict[str, int]] = {}

    async def trim_once(self) -> int:
        """One pass over all processes; returns the bytes released."""
        if self.admission is not None:
            self._completed_at_last = self.admission.completed
        self._last_t = time.monotonic()
        groups: dict[str, list[dict[str, Any]]] = {"api": [trim_heap()]}
        for name, engine in self.engines.items():
            if engine.errored:
                continue
            try:
                groups[name] = list(await engine.collective_rpc(RPC.TRIM_MEMORY))
            except Exception as e:  # noqa: BLE001 - an engine dying now is the watchdog's job
                log.warning("memory trim in the %s engine failed: %r", name, e)
        parts = [p for group in groups.values() for p in group]
        self.heap = {name: _sum_heaps(group) for name, group in groups.items()
                     if all(p.get("heap") for p in group)}
        released = sum(p.get("released_bytes") or 0 for p in parts)
        self.runs += 1
        self.released_last = released
        self.released_total += released
        self.ms_last = max((p.get("ms") or 0.0 for p in parts), default=0.0)
        log.debug("memory trim released %.1f MiB (slowest process %.1f ms)",
                  released / 2**20, self.ms_last)
        return released

    def due(self, now: float) -> bool:
        """Time for a trim: the interval has passed, or the server has just gone idle after
        serving something."""
        if now - self._last_t >= self.interval_s:
            return True
        adm = self.admission
        return (adm is not None and adm.active == 0 and adm.queued == 0
                and adm.completed != self._completed_at_last)

    async def run(self) -> None:
        """The loop (a task of ``serve``); returns at once when trimming is off."""
        if not self.interval_s:
            return
        while True:
            await asyncio.sleep(TICK_S)
            if self.due(time.monotonic()):
                try:
                    await self.trim_once()
                except Exception as e:  # noqa: BLE001 - keep trimming; say why once per pass
                    log.warning("memory trim failed: %r", e)

    def to_dict(self) -> dict[str, Any]:
        return {"interval_s": self.interval_s, "runs": self.runs,
                "released_bytes_last": self.released_last,
                "released_bytes_total": self.released_total, "ms_last": self.ms_last,
                "heap": self.heap}


def _sum_heaps(parts: list[dict[str, Any]]) -> dict[str, int]:
    keys = ("in_use_bytes", "free_bytes", "mmapped_bytes")
    return {k: sum(p["heap"][k] for p in parts) for k in keys}

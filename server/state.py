"""``GET /specapprox/state``: what the server holds right now, for leak checks and operators.

Why a route and not only ``/metrics``: a leak check needs numbers that are exact at the moment
of asking. vLLM reports an engine's KV-block usage only with the outputs of an engine step, so
after an *aborted* request (no further step) the gauges keep the last busy value. With
``?probe=1`` the route first sends each engine a one-token request; the stats of the step that
finishes it describe the pool as it is (its own blocks are already freed by then). The
compacted KV entries (target workers) and the SpecPC captures (draft workers) are read from
the workers themselves through ``collective_rpc``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psutil

from server.metrics import observer_of
from specapprox_vllm.frontend.target_runner import TargetKVRunner
from specapprox_vllm.vllm_compat import engine_pids
from specapprox_vllm.wire import RPC


async def _probe(engine: Any) -> None:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    async for _ in engine.generate({"prompt_token_ids": [0]}, params,
                                   f"specapprox-probe-{uuid.uuid4().hex}"):
        pass
    await asyncio.sleep(0.05)  # the stat loggers run in the same output-handler pass


def _engine_state(engine: Any) -> dict[str, Any]:
    obs = observer_of(engine)
    last = obs.last if obs is not None else {}
    return {"alive": not engine.errored, "pids": engine_pids(engine),
            "kv_blocks_total": last.get("total"), "kv_blocks_used": last.get("used"),
            "requests_running": last.get("running"), "requests_waiting": last.get("waiting")}


def _process_tree() -> dict[str, int]:
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    rss = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
        except psutil.Error:
            continue
    return {"rss_bytes": rss, "num_processes": len(procs)}


async def collect_state(client: Any, admission: Any, probe: bool = False,
                        trimmer: Any = None) -> dict[str, Any]:
    """The JSON of ``/specapprox/state`` (contract in docs/reliability.md)."""
    engines = {"target": client.target, "draft": client.draft}
    engines = {k: e for k, e in engines.items() if e is not None}
    if probe:
        await asyncio.gather(*[_probe(e) for e in engines.values() if not e.errored])
    out: dict[str, Any] = {
        "healthy": not client.errored,
        "engines": {name: _engine_state(e) for name, e in engines.items()},
        "compacted_kv": {"entries": None, "bytes": None},
        "draft_captures": None,
        "draft_failures": client.scheduler.draft_failures,
        "admission": admission.to_dict(),
        "process": _process_tree(),
        "memory_trim": trimmer.to_dict() if trimmer is not None else None,
    }
    if not client.target.errored:
        parts = await TargetKVRunner(client.target).store_info()
        out["compacted_kv"] = {"entries": sum(p["entries"] for p in parts),
                               "bytes": sum(p["bytes"] for p in parts)}
    # Prompt scores live in whichever engine drafts: the draft engine, or the target itself.
    alive = [e for e in engines.values() if not e.errored]
    if alive:
        out["draft_captures"] = sum([n for e in alive
                                     for n in await e.collective_rpc(RPC.PROMPT_SCORE_COUNT)])
    return out

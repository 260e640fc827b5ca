"""Where a draft stage's time goes: a draft engine alone, one long prompt at a time (issue 18's
profile of the cascade's time to first token).

Four draft runs per prompt, each on a fresh prompt (no prefix-cache hit), through the
server's own :class:`~specapprox_vllm.frontend.draft_runner.DraftRunner` on an engine built
as ``server/engines.py`` builds a separate draft (KV connector included):

* ``generate n=1`` / ``generate n=8``: plain greedy drafting (SpecKV's lookahead);
* ``specpc n=1``: SpecPC's scored draft at its default lookahead;
* ``cascade n=8``: the cascade's scored draft (SpecPC scores over 8 drafted tokens).

``capture ms`` is the time the workers spent scoring (``DraftResult.capture_ms``). Then the
paged-KV reader: one layer's keys of the prompt read element by element (a position tensor)
and page by page (a prefix length), on a cache of the engine's shape.

Usage::

    python -m specapprox_vllm.tools.bench.draft_stage --length 4096 --runs 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from specapprox_vllm.policies import SpecKVPCPolicy, SpecPCPolicy

RUNS = (("generate n=1", None, 1), ("generate n=8", None, 8),
        ("specpc n=1", SpecPCPolicy.name, 1), ("cascade n=8", SpecKVPCPolicy.name, 8))


def spread(values: list[float]) -> str:
    """``lo–hi`` of the runs (one value: itself), rounded to ms."""
    lo, hi = round(min(values)), round(max(values))
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


async def draft_runs(model: str, length: int, runs: int) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer
    from vllm.v1.engine.async_llm import AsyncLLM

    from server.config import load_config
    from server.engines import draft_engine_args
    from specapprox_vllm.frontend.draft_runner import DraftRunner
    from specapprox_vllm.policies import build_policy, make_approx_config
    from specapprox_vllm.tools.eval.needle import make_needle_case
    from specapprox_vllm.tools.eval.specpc_common import REPO

    cfg = load_config(REPO / "configs" / "default.yaml", {"draft.model": model,
                                                           "draft.share_target_engine": False},
                      environ={})
    engine = AsyncLLM.from_engine_args(draft_engine_args(cfg))
    runner = DraftRunner(engine)
    tok = AutoTokenizer.from_pretrained(model)
    out = []
    try:
        seed = 1000
        for _ in range(runs):
            for label, method, n in RUNS:
                seed += 1
                ids = make_needle_case(tok, length, seed=seed, depth=0.5).prompt_ids
                t0 = time.perf_counter()
                if method is None:
                    d = await runner.generate(ids, n, f"g{seed}")
                else:
                    policy = build_policy(make_approx_config(method, {}))
                    d = await runner.score_prompt(ids, policy, n, f"s{seed}")
                out.append({"run": label, "prompt_tokens": len(ids), "tokens": len(d.tokens),
                            "ms": round(1e3 * (time.perf_counter() - t0), 1),
                            "capture_ms": round(d.capture_ms, 1)})
                print(out[-1], flush=True)
    finally:
        engine.shutdown()
    return out


def paged_read_ms(length: int, repeats: int = 50) -> dict[str, float]:
    """ms per read of one layer's keys of ``length`` tokens, SmolLM2's KV shape (3 heads of
    64), 128-token blocks scattered over a pool."""
    from types import SimpleNamespace

    import torch

    from specapprox_vllm import vllm_compat

    bs = 128
    cache = torch.randn(400, 3, bs, 2 * 64)
    table = torch.randperm(400)[: -(-length // bs)].int()
    layer = SimpleNamespace(isa="vec")
    res = {}
    for name, pos in (("element by element", torch.arange(length)), ("page by page", length)):
        vllm_compat.paged_keys(layer, cache, table, pos)
        t0 = time.perf_counter()
        for _ in range(repeats):
            vllm_compat.paged_keys(layer, cache, table, pos)
        res[name] = round(1e3 * (time.perf_counter() - t0) / repeats, 3)
    return res


def main(argv: list[str] | None = None) -> int:
    from specapprox_vllm.tools.eval.specpc_common import MODEL_DIR, REPO, machine_info

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "docs/results/draft_stage.json")
    args = p.parse_args(argv)
    records = asyncio.run(draft_runs(args.model, args.length, args.runs))
    reads = paged_read_ms(args.length)
    lines = ["| draft run | ms (range over runs) | of which scoring ms |", "|---|---:|---:|"]
    for label, _, _ in RUNS:
        mine = [r for r in records if r["run"] == label]
        lines.append(f"| {label} | {spread([r['ms'] for r in mine])} | "
                     f"{spread([r['capture_ms'] for r in mine])} |")
    lines.append("")
    lines += [f"One layer's keys of {args.length} tokens, {k}: {v} ms" for k, v in reads.items()]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv),
                                    "machine": machine_info(), "records": records,
                                    "paged_read_ms": reads}, indent=1))
    args.out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

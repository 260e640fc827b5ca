#!/usr/bin/env python
"""SpecKV (kv_budget C=256) vs full KV under load, served by our server: issue 5's benchmark.

Why: SpecKV keeps C KV entries per layer and KV head instead of the whole prompt, so a decode
request holds cdiv(C+1+max_tokens, block) KV blocks instead of cdiv(prompt+max_tokens, block).
At a fixed KV pool more requests fit at once; this measures how much of that reaches a client.

What: one server (target + draft engine, same settings for both methods: a target KV pool of
``--pool-full-requests`` full requests, ``--block-size``, ``--max-num-seqs``), then
1. a warm-up request of each method (discarded);
2. one lone prompt with ``none`` and ``max_tokens=1``: the target prefill time, the
   denominator of "capture+select+compact as a share of the prefill" (``usage.approx.select_ms``
   is the worker time of capture + select + gather + re-rotate, summed over layers); one lone
   ``speckv`` request gives the same share without contention;
3. ``--requests`` concurrent streamed requests with ``none``, then the same with ``speckv``
   (fresh prompts: every prompt is a distinct needle case with a unique tag in front, so prefix
   caching cannot share them; ``ignore_eos`` so every reply has ``--max-tokens`` tokens).
While 3 runs, ``GET /metrics`` is polled every ``--poll-s``: peak requests in the target's
running batch (``specapprox_engine_requests_running{engine="target"}``; for SpecKV it also
counts the short scoring requests), queue, KV blocks used, preemptions. Client-side, the peak
number of requests between their first and last token ("decoding at once") is counted too.
Goals (issue 5) are reported, never asserted: output tokens/s >= 4x, peak resident >= 10x
(beside the theoretical (P+M)/(C+M)), select share <= 10 % of the prefill.

Usage::

    python scripts/bench_speckv.py                  # 16 x 4k prompts, 128 tokens, C=256
    python scripts/bench_speckv.py --requests 4 --prompt-tokens 1024 --max-tokens 16 \\
        --out /tmp/bench_speckv.json --wait-quiet 0  # smoke

Writes ``docs/results/bench_speckv.json`` and ``.png`` (``--out``; the PNG sits beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_prefill import tagged_messages  # noqa: E402
from specpc_eval_common import (  # noqa: E402
    MODEL_DIR,
    MODEL_NAME,
    REPO,
    Server,
    cpu_counters,
    draft_server_args,
    foreign_cores,
    load_snapshot,
    machine_info,
    wait_for_quiet,
)

from specapprox_vllm.eval.needle import make_needle_case  # noqa: E402
from specapprox_vllm.loadtest.client import RunConfig, run_setting  # noqa: E402
from specapprox_vllm.loadtest.prompts import Prompt  # noqa: E402
from specapprox_vllm.loadtest.stats import RequestRecord, percentile  # noqa: E402

GiB = 1 << 30
METHODS = ("none", "speckv")
# /metrics series sampled during the runs: key -> (sample name, labels that must match)
SERIES = {"running": ("specapprox_engine_requests_running", {"engine": "target"}),
          "waiting": ("specapprox_engine_queue_depth", {"engine": "target"}),
          "kv_used_blocks": ("specapprox_engine_kv_blocks", {"engine": "target", "state": "used"}),
          "kv_total_blocks": ("specapprox_engine_kv_blocks",
                              {"engine": "target", "state": "total"}),
          "draft_running": ("specapprox_engine_requests_running", {"engine": "draft"}),
          "vllm_running": ("vllm:num_requests_running", {}),
          "vllm_kv_usage": ("vllm:kv_cache_usage_perc", {}),
          "preemptions": ("vllm:num_preemptions_total", {})}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kv_token_bytes() -> int:
    """Bytes of one token's K and V over all layers and KV heads of the target (fp32)."""
    c = json.loads((MODEL_DIR / "config.json").read_text())
    head = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head * 4


def parse_metrics(text: str) -> dict[str, float]:
    """The ``SERIES`` values of one /metrics scrape (sums over the other labels)."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            for key, (name, labels) in SERIES.items():
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    out[key] = out.get(key, 0.0) + float(s.value)
    return out


async def poll_metrics(client: httpx.AsyncClient, url: str, t0: float, period: float,
                       samples: list[dict[str, float]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            r = await client.get(url)
            samples.append({"t": round(time.perf_counter() - t0, 3), **parse_metrics(r.text)})
        except httpx.HTTPError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), period)
        except asyncio.TimeoutError:
            pass


def make_prompts(tok: Any, n: int, prompt_tokens: int, max_tokens: int, seed0: int
                 ) -> list[Prompt]:
    """``n`` distinct needle prompts of about ``prompt_tokens`` tokens (chat template and tag
    included), each with a unique tag in front."""
    probe = make_needle_case(tok, prompt_tokens, seed=seed0, depth=0.5)
    tag = len(tok.encode("[request 0123456789ab] ", add_special_tokens=False))
    ctx = max(16, 2 * prompt_tokens - len(probe.prompt_ids) - tag)
    return [Prompt(None, tagged_messages(make_needle_case(tok, ctx, seed=seed0 + i, depth=0.5)),
                   max_tokens) for i in range(n)]


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant (sweep over start/end events)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals],
                    key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def med(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize(recs: list[RequestRecord], wall: float, samples: list[dict[str, float]],
              max_tokens: int) -> dict[str, Any]:
    ok = [r for r in recs if r.success and r.ttft is not None and r.last_token is not None]
    toks = [r.completion_tokens or 0 for r in ok]
    first = [r.start + r.ttft for r in ok]  # type: ignore[operator]
    last = [r.start + r.last_token for r in ok]  # type: ignore[operator]
    decode_span = (max(last) - min(first)) if ok else 0.0
    ttft = [r.ttft for r in ok if r.ttft is not None]
    per_req = [(n - 1) / (b - a) for n, a, b in zip(toks, first, last, strict=True) if b > a]

    def peak(key: str) -> float | None:
        vals = [s[key] for s in samples if key in s]
        return (int(max(vals)) if max(vals).is_integer() else max(vals)) if vals else None

    pre = [int(s["preemptions"]) for s in samples if "preemptions" in s]
    approx = [r.approx for r in ok if isinstance(r.approx, dict)]

    def amed(key: str) -> float | None:
        return med([float(a[key]) for a in approx if isinstance(a.get(key), (int, float))])

    return {
        "requests_ok": len(ok), "requests_failed": len(recs) - len(ok),
        "errors": sorted({f"{r.error_type}: {r.error}"[:200] for r in recs if not r.success}),
        "prompt_tokens_median": med([float(r.prompt_tokens or 0) for r in ok]),
        "output_tokens": sum(toks), "all_max_tokens": all(t == max_tokens for t in toks),
        "wall_s": round(wall, 3), "output_tok_s": round(sum(toks) / wall, 3) if wall else None,
        "decode_tok_s": round(sum(t - 1 for t in toks) / decode_span, 3) if decode_span else None,
        "per_request_decode_tok_s_median": med(per_req),
        "ttft_p50_s": round(percentile(ttft, 50), 3) if ttft else None,
        "ttft_p90_s": round(percentile(ttft, 90), 3) if ttft else None,
        "ttft_max_s": round(max(ttft), 3) if ttft else None,
        "peak_running": peak("running"), "peak_vllm_running": peak("vllm_running"),
        "peak_waiting": peak("waiting"), "peak_kv_used_blocks": peak("kv_used_blocks"),
        "peak_draft_running": peak("draft_running"),
        "preemptions": (max(pre) - min(pre)) if pre else None,
        "peak_decoding_client": peak_overlap(list(zip(first, last, strict=True))),
        "metric_samples": len(samples),
        "approx_applied": sum(1 for a in approx if a.get("applied")),
        **{f"{k}_median": amed(k) for k in ("draft_ms", "score_ms", "select_ms",
                                            "kv_blocks_before", "kv_blocks_after")},
    }


async def run_one(client: httpx.AsyncClient, cfg: RunConfig, prompts: list[Prompt],
                  approx: dict[str, Any], label: str, period: float, pgid: int | None
                  ) -> tuple[list[RequestRecord], float, list[dict[str, float]], float]:
    """All prompts at once with ``approx``; records, wall, /metrics samples, foreign cores."""
    samples: list[dict[str, float]] = []
    stop = asyncio.Event()
    cpu0, t0 = cpu_counters(pgid), time.perf_counter()
    poller = asyncio.create_task(poll_metrics(client, cfg.root_url + "/metrics", t0, period,
                                              samples, stop))
    recs, wall = await run_setting(client, cfg, prompts, label, approx)
    stop.set()
    await poller
    return recs, wall, samples, foreign_cores(cpu0, cpu_counters(pgid))


async def bench(args: argparse.Namespace, srv: Server, tok: Any, approx: dict[str, Any],
                settings: dict[str, Any]) -> dict[str, Any]:
    res: dict[str, Any] = {"settings": settings, "lone": {}, "runs": {}}
    limits = httpx.Limits(max_connections=args.requests + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600, connect=10), limits=limits,
                                 trust_env=False) as client:
        cfg = RunConfig(root_url=srv.base_url, backend="chat", model=MODEL_NAME,
                        ignore_eos=True)
        first = parse_metrics((await client.get(srv.base_url + "/metrics")).text)
        total = first.get("kv_total_blocks")
        settings["pool_blocks_reported"] = int(total) if total is not None else None
        methods = {"none": {"method": "none"}, "speckv": approx}
        lone = make_prompts(tok, 4, args.prompt_tokens, 1, args.seed0 + 1000)
        print("  warm-up (one request per method, discarded)", flush=True)
        for i, m in enumerate(METHODS):
            await run_setting(client, cfg, [lone[i]], "warmup", methods[m])
        if args.wait_quiet > 0:
            print(f"  quiet machine: {wait_for_quiet(srv.pgid, args.wait_quiet)}", flush=True)
        for i, m in enumerate(METHODS):
            (rec,), _ = await run_setting(client, cfg, [lone[2 + i]], f"lone-{m}", methods[m])
            res["lone"][m] = {"ttft_ms": round(1e3 * (rec.ttft or float("nan")), 1),
                              "approx": rec.approx, "prompt_tokens": rec.prompt_tokens,
                              "error": rec.error}
            print(f"  lone {m}: TTFT {res['lone'][m]['ttft_ms']} ms", flush=True)
        for j, m in enumerate(METHODS):
            prompts = make_prompts(tok, args.requests, args.prompt_tokens, args.max_tokens,
                                   args.seed0 + 100 * j)
            print(f"  {m}: {args.requests} concurrent requests", flush=True)
            recs, wall, samples, foreign = await run_one(client, cfg, prompts, methods[m], m,
                                                         args.poll_s, srv.pgid)
            res["runs"][m] = {"summary": {**summarize(recs, wall, samples, args.max_tokens),
                                          "foreign_cores": foreign},
                              "records": [r.to_json() for r in recs], "timeline": samples}
            print(f"  {m}: {wall:.1f} s, foreign cores {foreign}", flush=True)
    return res


def derive(res: dict[str, Any]) -> dict[str, Any]:
    """Ratios speckv/none and the select share of the target prefill."""
    n, s = res["runs"]["none"]["summary"], res["runs"]["speckv"]["summary"]

    def ratio(a: Any, b: Any) -> float | None:
        return round(a / b, 3) if isinstance(a, (int, float)) and b else None

    prefill = res["lone"]["none"]["ttft_ms"]
    lone_sel = (res["lone"]["speckv"]["approx"] or {}).get("select_ms")
    keys = ("output_tok_s", "decode_tok_s", "per_request_decode_tok_s_median", "ttft_p50_s",
            "peak_running", "peak_decoding_client")
    st = res["settings"]
    return {**{k: ratio(s[k], n[k]) for k in keys},
            "capacity": ratio(st["capacity_speckv"], st["capacity_none"]),
            "theoretical_tokens": round(st["tokens_full"] / st["tokens_speckv"], 2),
            "select_share_of_prefill": ratio(s["select_ms_median"], prefill),
            "lone_select_share_of_prefill": ratio(lone_sel, prefill)}


def print_table(res: dict[str, Any]) -> None:
    n, s = res["runs"]["none"]["summary"], res["runs"]["speckv"]["summary"]
    r, st = res["ratios"], res["settings"]

    def f(v: Any, fmt: str = ".2f") -> str:
        return "-" if v is None else format(v, fmt) if isinstance(v, float) else str(v)

    rows = [("output tokens/s", "output_tok_s", "output_tok_s", ">= 4x"),
            ("decode tokens/s (system)", "decode_tok_s", "decode_tok_s", ""),
            ("decode tokens/s per request (p50)", "per_request_decode_tok_s_median",
             "per_request_decode_tok_s_median", ""),
            ("wall (s)", "wall_s", None, ""), ("TTFT p50 (s)", "ttft_p50_s", "ttft_p50_s", ""),
            ("TTFT p90 (s)", "ttft_p90_s", None, ""), ("TTFT max (s)", "ttft_max_s", None, ""),
            ("peak running, target engine", "peak_running", "peak_running",
             f">= 10x (theory {r['theoretical_tokens']:.1f}x)"),
            ("peak decoding at once (client)", "peak_decoding_client", "peak_decoding_client",
             ""),
            ("peak waiting, target", "peak_waiting", None, ""),
            ("peak KV blocks used, target", "peak_kv_used_blocks", None, ""),
            ("preemptions", "preemptions", None, ""),
            ("foreign cores (other processes)", "foreign_cores", None, "")]
    head = f"{'':<36}{'none':>10}{'speckv':>10}{'ratio':>9}  goal"
    print(f"\n{res['requests']} concurrent x {st['prompt_tokens']}-token prompts, "
          f"{st['max_tokens']} output tokens, SpecKV C={st['kv_budget']} n={st['lookahead']} "
          f"draft {st['draft_layers']}; pool {st['pool_blocks_reported']} blocks of "
          f"{st['block_size']}, max_num_seqs {st['max_num_seqs']}\n{head}\n{'-' * len(head)}")
    for label, key, rkey, goal in rows:
        print(f"{label:<36}{f(n.get(key)):>10}{f(s.get(key)):>10}"
              f"{f(r.get(rkey) if rkey else None):>9}  {goal}")
    print(f"{'resident capacity from blocks':<36}{st['capacity_none']:>10}"
          f"{st['capacity_speckv']:>10}{f(r['capacity']):>9}  "
          f"theory {st['tokens_full']}/{st['tokens_speckv']} = "
          f"{r['theoretical_tokens']:.1f}x")
    lone = res["lone"]
    print(f"\nSpecKV medians (concurrent): draft {f(s['draft_ms_median'], '.0f')} ms, score "
          f"{f(s['score_ms_median'], '.0f')} ms, select {f(s['select_ms_median'], '.1f')} ms, "
          f"KV blocks {f(s['kv_blocks_before_median'], '.0f')} -> "
          f"{f(s['kv_blocks_after_median'], '.0f')}; applied {s['approx_applied']}/"
          f"{s['requests_ok']}")
    print(f"target prefill (lone none, TTFT max_tokens=1): {lone['none']['ttft_ms']} ms; "
          f"select / prefill = {f(r['select_share_of_prefill'], '.1%')} concurrent, "
          f"{f(r['lone_select_share_of_prefill'], '.1%')} lone (goal <= 10%)")


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, st = res["runs"], res["settings"]
    colors = {"none": "tab:grey", "speckv": "tab:blue"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = ((("output tok/s", "output_tok_s"), ("decode tok/s", "decode_tok_s")),
              (("TTFT p50 (s)", "ttft_p50_s"), ("TTFT p90 (s)", "ttft_p90_s")))
    for ax, bars in zip(axes[:2], panels, strict=True):
        for i, (_, key) in enumerate(bars):
            for j, m in enumerate(METHODS):
                ax.bar(i + (j - 0.5) * 0.38, runs[m]["summary"][key] or 0, 0.38,
                       color=colors[m], label=m if i == 0 else None)
        ax.set_xticks([0, 1])
        ax.set_xticklabels([label for label, _ in bars])
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[2]
    for m in METHODS:
        tl = [s for s in runs[m]["timeline"] if "running" in s]
        ax.step([s["t"] for s in tl], [s["running"] for s in tl], where="post",
                color=colors[m], label=f"{m} (capacity {st[f'capacity_{m}']})")
    ax.set_xlabel("s since the first request")
    ax.set_ylabel("requests running, target engine")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(f"SpecKV C={st['kv_budget']} vs full KV: {res['requests']} x "
                 f"{st['prompt_tokens']} tokens, {st['max_tokens']} out, "
                 f"pool {st['pool_blocks_reported']} blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--kv-budget", type=int, default=256)
    p.add_argument("--lookahead", type=int, default=16, help="draft tokens n")
    p.add_argument("--draft-layers", default="8", help="k (--draft.num_layers k) or 'full'")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--pool-full-requests", type=float, default=4.0,
                   help="target KV pool size, in full (prompt + max_tokens) requests")
    p.add_argument("--kv-cache-gib", type=float,
                   help="target KV pool in GiB (overrides --pool-full-requests)")
    p.add_argument("--poll-s", type=float, default=0.25, help="/metrics polling period")
    p.add_argument("--seed0", type=int, default=5000, help="first needle seed")
    p.add_argument("--wait-quiet", type=float, default=600.0,
                   help="seconds to wait before timing until other processes use < 0.2 "
                        "cores (0: do not wait)")
    p.add_argument("--out", type=Path, default=REPO / "docs/results/bench_speckv.json")
    args = p.parse_args(argv)

    P, M, C, bs = args.prompt_tokens, args.max_tokens, args.kv_budget, args.block_size
    tb = kv_token_bytes()
    per_full = cdiv(P + M, bs)
    blocks = round(args.pool_full_requests * per_full)
    gib = args.kv_cache_gib or ((blocks + 1.5) * bs * tb / GiB)  # + vLLM's null block
    max_len = cdiv(P + max(M, args.lookahead) + 256, bs) * bs
    layers = None if args.draft_layers.lower() in ("full", "30") else int(args.draft_layers)
    server_args = ["--target.kv_cache_memory_gib", f"{gib:.6f}", "--target.block_size", str(bs),
                   "--target.max_num_seqs", str(args.max_num_seqs),
                   "--target.max_model_len", str(max_len), *draft_server_args(layers)]
    approx = {"method": "speckv", "kv_budget": C, "lookahead": args.lookahead}
    settings: dict[str, Any] = {
        "prompt_tokens": P, "max_tokens": M, "kv_budget": C, "lookahead": args.lookahead,
        "draft_layers": args.draft_layers, "block_size": bs, "max_num_seqs": args.max_num_seqs,
        "kv_token_bytes": tb, "kv_cache_memory_gib": round(gib, 6), "pool_blocks_planned": blocks,
        "max_model_len": max_len, "server_args": server_args, "approx": approx,
        "tokens_full": P + M, "tokens_speckv": C + M,
        "blocks_per_request_none": per_full, "blocks_per_request_speckv": cdiv(C + 1 + M, bs)}

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    with Server(server_args) as srv:
        before = load_snapshot()
        res = asyncio.run(bench(args, srv, tok, approx, settings))
    pool = int(settings["pool_blocks_reported"] or blocks)
    for m in METHODS:
        # KV blocks only; --max-num-seqs caps what can be observed at once
        settings[f"capacity_{m}"] = pool // settings[f"blocks_per_request_{m}"]
    res = {"description": __doc__.split("\n\n")[0], "machine": machine_info(),
           "command": " ".join(["python", "scripts/bench_speckv.py", *(argv or sys.argv[1:])]),
           "requests": args.requests, "server_startup_s": srv.startup_s,
           "load_before": before, "load_after": load_snapshot(), **res}
    res["ratios"] = derive(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print_table(res)
    png = args.out.with_suffix(".png")
    plot(res, png)
    print(f"\nwrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Approximate methods vs full KV under load, served by our server: issues 5 and 6's benchmark.

Why: SpecKV keeps C KV entries per layer and KV head instead of the whole prompt, so a decode
request holds cdiv(C+1+max_tokens, block) KV blocks instead of cdiv(prompt+max_tokens, block).
At a fixed KV pool more requests fit at once; this measures how much of that reaches a client,
for ``--methods`` side by side in one run (default none vs speckv, issue 5; issue 6: all six).
Same budget: the KV methods (streamingllm, snapkv, speckv with ``--lookahead``, speckv_pc with
its default lookahead after a ``--cascade-prompt-budget`` SpecPC stage) keep ``--kv-budget`` C
entries; specpc's is a *prompt* budget (``--prompt-budget`` tokens kept, then their full KV).
With a draft of k <= 8 layers, specpc and speckv_pc get ``start_layer`` k // 2 (default 8).

What: one server (target + draft engine, same settings for every method: a target KV pool of
``--pool-full-requests`` full requests, ``--block-size``, ``--max-num-seqs``), then
1. a warm-up request of each method (discarded);
2. with speckv: one lone prompt with ``none`` and ``max_tokens=1``: the target prefill time,
   the denominator of "capture+select+compact as a share of the prefill"
   (``usage.approx.select_ms`` is the worker time of capture + select + gather + re-rotate,
   summed over layers); one lone ``speckv`` request gives the same share without contention;
3. ``--requests`` concurrent streamed requests per method, ``none`` first (the reference of
   every ratio; fresh prompts: every prompt is a distinct needle case with a unique tag in
   front, so prefix caching cannot share them; ``ignore_eos``: ``--max-tokens`` tokens each).
While 3 runs, ``GET /metrics`` is polled every ``--poll-s``: peak requests in the target's
running batch (``specapprox_engine_requests_running{engine="target"}``; for KV methods it also
counts the short scoring requests), queue, KV blocks used, preemptions. Client-side, the peak
number of requests between their first and last token ("decoding at once") is counted too.
Goals (issue 5, speckv) are reported, never asserted: output tokens/s >= 4x, peak resident
>= 10x (beside the theoretical (P+M)/(C+M)), select share <= 10 % of the prefill.

Usage::

    python -m specapprox_vllm.tools.bench.speckv    # 16 x 4k prompts, 128 tokens, C=256
    python scripts/bench_speckv.py                  # the same, from a checkout
    python scripts/bench_speckv.py --methods none,streamingllm,snapkv,speckv,specpc,speckv_pc \\
        --out docs/results/bench_methods.json       # issue 6: all six methods
    python scripts/bench_speckv.py --requests 4 --prompt-tokens 1024 --max-tokens 16 \\
        --out /tmp/bench_speckv.json --wait-quiet 0  # smoke

Writes ``docs/results/bench_speckv.json`` and ``.png`` (``--out``; the PNG sits beside it):
``runs[method]``, ``ratios`` (speckv / none) and ``ratios_by_method[method]`` (method / none).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from specapprox_vllm.policies import (
    NonePolicy,
    SnapKVPolicy,
    SpecKVPCPolicy,
    SpecKVPolicy,
    SpecPCPolicy,
    StreamingLLMPolicy,
    get_policy,
    method_names,
)
from specapprox_vllm.tools.bench.prefill import tagged_messages
from specapprox_vllm.tools.bench.run_stats import parse_metrics, poll_metrics, summarize
from specapprox_vllm.tools.eval.needle import make_needle_case
from specapprox_vllm.tools.eval.specpc_common import (
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
from specapprox_vllm.tools.loadtest.client import RunConfig, run_setting
from specapprox_vllm.tools.loadtest.prompts import Prompt
from specapprox_vllm.tools.loadtest.stats import RequestRecord

GiB = 1 << 30
#: The reference (full KV), the method this benchmark is about, and the cascade (whose served
#: lookahead is read from its YAML).
NONE, SPECKV, CASCADE = NonePolicy.name, SpecKVPolicy.name, SpecKVPCPolicy.name
COLORS = {NONE: "tab:grey", StreamingLLMPolicy.name: "tab:brown", SnapKVPolicy.name: "tab:orange",
          SPECKV: "tab:blue", SpecPCPolicy.name: "tab:green", CASCADE: "tab:purple"}
# ratio vs none of these summary keys, per method
RATIO_KEYS = ("output_tok_s", "decode_tok_s", "per_request_decode_tok_s_median", "ttft_p50_s",
              "peak_running", "peak_decoding_client")
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kv_token_bytes() -> int:
    """Bytes of one token's K and V over all layers and KV heads of the target (fp32)."""
    c = json.loads((MODEL_DIR / "config.json").read_text())
    head = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head * 4


def parse_methods(text: str) -> list[str]:
    """``--methods``: known names, ``none`` first (the reference), then the given order."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in method_names()]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from "
                                         f"{method_names()}")
    return [NONE, *[m for m in dict.fromkeys(names) if m != NONE]]


def method_plan(m: str, args: argparse.Namespace, k: int | None) -> dict[str, Any]:
    """``approx`` of method ``m`` (``k``: draft layers, None = full), KV tokens a decode
    request holds in theory (``tokens``: kept prompt + output) and KV blocks it holds."""
    P, M, C, bs = args.prompt_tokens, args.max_tokens, args.kv_budget, args.block_size
    policy = get_policy(m)
    approx: dict[str, Any] = {"method": m}
    if policy.compresses_kv:
        kept, approx["kv_budget"] = min(C, P), C
        if m == SPECKV:
            approx["lookahead"] = args.lookahead
        if policy.compresses_prompt:  # the cascade: a SpecPC stage first
            approx["prompt_budget"] = args.cascade_prompt_budget
    elif policy.compresses_prompt:  # a prompt budget: the kept prompt tokens get a full KV
        kept, approx["prompt_budget"] = min(args.prompt_budget, P), args.prompt_budget
    else:
        kept = P
    if policy.compresses_prompt and k is not None and k <= 8:
        approx["start_layer"] = k // 2  # SpecPC's default 8 needs a draft of > 8 layers
    # a compacted KV method holds C+1 entries (issue 5's accounting); a short prompt is whole
    extra = int(policy.compresses_kv and kept < P)
    return {"approx": approx, "tokens": kept + M, "blocks": cdiv(kept + extra + M, bs)}


def ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, (int, float)) and b else None


def make_prompts(tok: Any, n: int, prompt_tokens: int, max_tokens: int, seed0: int
                 ) -> list[Prompt]:
    """``n`` distinct needle prompts of about ``prompt_tokens`` tokens (chat template and tag
    included), each with a unique tag in front."""
    probe = make_needle_case(tok, prompt_tokens, seed=seed0, depth=0.5)
    tag = len(tok.encode("[request 0123456789ab] ", add_special_tokens=False))
    ctx = max(16, 2 * prompt_tokens - len(probe.prompt_ids) - tag)
    return [Prompt(None, tagged_messages(make_needle_case(tok, ctx, seed=seed0 + i, depth=0.5)),
                   max_tokens) for i in range(n)]


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
    """Warm-up, lone prefill (with speckv) and one concurrent run per method (``approx``:
    method -> request ``approx``, ``none`` first)."""
    res: dict[str, Any] = {"settings": settings, "lone": {}, "runs": {}}
    methods = list(approx)
    limits = httpx.Limits(max_connections=args.requests + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600, connect=10), limits=limits,
                                 trust_env=False) as client:
        cfg = RunConfig(root_url=srv.base_url, backend="chat", model=MODEL_NAME,
                        ignore_eos=True)
        first = parse_metrics((await client.get(srv.base_url + "/metrics")).text)
        total = first.get("kv_total_blocks")
        settings["pool_blocks_reported"] = int(total) if total is not None else None
        lone = make_prompts(tok, len(methods) + 2, args.prompt_tokens, 1, args.seed0 + 1000)
        print("  warm-up (one request per method, discarded)", flush=True)
        for i, m in enumerate(methods):
            await run_setting(client, cfg, [lone[i]], "warmup", approx[m])
        if args.wait_quiet > 0:
            print(f"  quiet machine: {wait_for_quiet(srv.pgid, args.wait_quiet)}", flush=True)
        for i, m in enumerate((NONE, SPECKV) if SPECKV in methods else ()):
            (rec,), _ = await run_setting(client, cfg, [lone[len(methods) + i]], f"lone-{m}",
                                          approx[m])
            res["lone"][m] = {"ttft_ms": round(1e3 * (rec.ttft or float("nan")), 1),
                              "approx": rec.approx, "prompt_tokens": rec.prompt_tokens,
                              "error": rec.error}
            print(f"  lone {m}: TTFT {res['lone'][m]['ttft_ms']} ms", flush=True)
        for j, m in enumerate(methods):
            prompts = make_prompts(tok, args.requests, args.prompt_tokens, args.max_tokens,
                                   args.seed0 + 100 * j)
            print(f"  {m}: {args.requests} concurrent requests", flush=True)
            recs, wall, samples, foreign = await run_one(client, cfg, prompts, approx[m], m,
                                                         args.poll_s, srv.pgid)
            res["runs"][m] = {"approx": approx[m],
                              "summary": {**summarize(recs, wall, samples, args.max_tokens),
                                          "foreign_cores": foreign},
                              "records": [r.to_json() for r in recs], "timeline": samples}
            print(f"  {m}: {wall:.1f} s, foreign cores {foreign}", flush=True)
    return res


def derive(res: dict[str, Any], m: str) -> dict[str, Any]:
    """Ratios of method ``m`` to none, and its select share of the target prefill."""
    n, s, st = res["runs"][NONE]["summary"], res["runs"][m]["summary"], res["settings"]
    prefill = res["lone"].get(NONE, {}).get("ttft_ms")
    out = {**{k: ratio(s[k], n[k]) for k in RATIO_KEYS},
           "capacity": ratio(st[f"capacity_{m}"], st[f"capacity_{NONE}"]),
           "theoretical_tokens": round(st["tokens_full"] / st[f"tokens_{m}"], 2),
           "select_share_of_prefill": ratio(s["select_ms_median"], prefill)}
    if m == SPECKV:
        lone_sel = (res["lone"][SPECKV]["approx"] or {}).get("select_ms")
        out["lone_select_share_of_prefill"] = ratio(lone_sel, prefill)
    return out


def fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def describe(m: str, st: dict[str, Any]) -> str:
    """The budget of method ``m`` in words."""
    C, policy = st["kv_budget"], get_policy(m)
    if m == SPECKV:
        return f"SpecKV C={C} n={st['lookahead']}"
    if policy.compresses_kv and policy.compresses_prompt:
        return (f"{m} C={C} n={st['cascade_lookahead']} after a "
                f"{st['cascade_prompt_budget']}-token prompt budget")
    if policy.compresses_kv:
        return f"{m} C={C}"
    if policy.compresses_prompt:
        return f"{m} prompt budget {st['prompt_budget']} (prompt tokens kept, not KV entries)"
    return m


def print_table(res: dict[str, Any]) -> None:
    st, methods = res["settings"], res["settings"]["methods"]
    others, rb, r = methods[1:], res["ratios_by_method"], res["ratios"]
    val = {m: {**res["runs"][m]["summary"], "capacity": st[f"capacity_{m}"],
               "tokens": st["tokens_full" if m == NONE else f"tokens_{m}"]} for m in methods}
    rat = {m: {**rb[m], "tokens": rb[m]["theoretical_tokens"]} for m in others}
    th = f"{r['theoretical_tokens']:.1f}x" if r else ""
    rows = [("output tokens/s", "output_tok_s", True, ">= 4x"),
            ("decode tokens/s (system)", "decode_tok_s", True, ""),
            ("decode tokens/s per request (p50)", "per_request_decode_tok_s_median", True, ""),
            ("wall (s)", "wall_s", False, ""), ("TTFT p50 (s)", "ttft_p50_s", True, ""),
            ("TTFT p90 (s)", "ttft_p90_s", False, ""), ("TTFT max (s)", "ttft_max_s", False, ""),
            ("peak running, target engine", "peak_running", True, f">= 10x (theory {th})"),
            ("peak decoding at once (client)", "peak_decoding_client", True, ""),
            ("peak waiting, target", "peak_waiting", False, ""),
            ("peak KV blocks used, target", "peak_kv_used_blocks", False, ""),
            ("preemptions", "preemptions", False, ""),
            ("foreign cores (other processes)", "foreign_cores", False, ""),
            ("requests failed", "requests_failed", False, ""),
            ("approx applied", "approx_applied", False, ""),
            ("resident capacity from blocks", "capacity", True,
             f"theory {st['tokens_full']}/{st.get('tokens_speckv')} = {th}"),
            ("KV tokens per request (theory)", "tokens", True, "")]
    single = len(others) == 1  # none vs one method: one table, as in issue 5
    vcols = [(m, val[m], max(10, len(m) + 2), False) for m in methods]
    rcols = [("ratio" if single else m, rat[m], max(9, len(m) + 2), True) for m in others]
    print(f"\n{res['requests']} concurrent x {st['prompt_tokens']}-token prompts, "
          f"{st['max_tokens']} output tokens,{' ' if single else chr(10)}"
          f"{'; '.join(describe(m, st) for m in others)}; draft {st['draft_layers']}; pool "
          f"{st['pool_blocks_reported']} blocks of {st['block_size']}, max_num_seqs "
          f"{st['max_num_seqs']}")
    tables = [(vcols + rcols, rows)] if single else [
        (vcols, rows), (rcols, [row for row in rows if row[2]])]
    for t, (cols, trows) in enumerate(tables):
        goal = bool(r) and t == len(tables) - 1  # issue 5's goals, for speckv
        head = (f"{f'ratio vs {NONE}' if t else '':<36}"
                + "".join(f"{h:>{w}}" for h, _, w, _ in cols)
                + ("  goal" + ("" if single else f" ({SPECKV})") if goal else ""))
        print(f"{chr(10) if t else ''}{head}\n{'-' * len(head)}")
        for label, key, has_ratio, g in trows:
            cells = "".join(f"{fmt(d.get(key) if has_ratio or not is_r else None):>{w}}"
                            for _, d, w, is_r in cols)
            print(f"{label:<36}{cells}" + (f"  {g}" if goal and g else ""))
    print()
    for m in others:
        s = {k: val[m][f"{k}_median"] for k in ("draft_ms", "score_ms", "select_ms",
                                                "prompt_tokens_kept", "kv_blocks_before")}
        parts = [f"{name} {fmt(s[k], spec)} {unit}" for name, k, spec, unit in (
            ("draft", "draft_ms", ".0f", "ms"), ("score", "score_ms", ".0f", "ms"),
            ("select", "select_ms", ".1f", "ms"), ("prompt kept", "prompt_tokens_kept", ".0f",
                                                   "tokens"))
            if s[k] is not None and (k != "prompt_tokens_kept"
                                     or get_policy(m).compresses_prompt)]
        if s["kv_blocks_before"] is not None:
            parts.append(f"KV blocks {fmt(s['kv_blocks_before'], '.0f')} -> "
                         f"{fmt(val[m]['kv_blocks_after_median'], '.0f')}")
        print(f"{'SpecKV' if m == SPECKV else m} medians (concurrent): {', '.join(parts)}; "
              f"applied {val[m]['approx_applied']}/{val[m]['requests_ok']}"
              + "".join(f"\n  error: {e}" for e in val[m]["errors"]))
    if r:
        print(f"target prefill (lone {NONE}, TTFT max_tokens=1): {res['lone'][NONE]['ttft_ms']}"
              f" ms; select / prefill = {fmt(r['select_share_of_prefill'], '.1%')} concurrent, "
              f"{fmt(r['lone_select_share_of_prefill'], '.1%')} lone (goal <= 10%)")


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, st = res["runs"], res["settings"]
    methods = st["methods"]
    w = 0.76 / len(methods)
    fig, axes = plt.subplots(1, 3, figsize=(13 + len(methods) - 2, 4))
    panels = ((("output tok/s", "output_tok_s"), ("decode tok/s", "decode_tok_s")),
              (("TTFT p50 (s)", "ttft_p50_s"), ("TTFT p90 (s)", "ttft_p90_s")))
    for ax, bars in zip(axes[:2], panels, strict=True):
        for i, (_, key) in enumerate(bars):
            for j, m in enumerate(methods):
                ax.bar(i + (j - (len(methods) - 1) / 2) * w, runs[m]["summary"][key] or 0, w,
                       color=COLORS.get(m), label=m if i == 0 else None)
        ax.set_xticks([0, 1])
        ax.set_xticklabels([label for label, _ in bars])
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[2]
    for m in methods:
        tl = [s for s in runs[m]["timeline"] if "running" in s]
        ax.step([s["t"] for s in tl], [s["running"] for s in tl], where="post",
                color=COLORS.get(m), label=f"{m} (capacity {st[f'capacity_{m}']})")
    ax.set_xlabel("s since the method's first request")
    ax.set_ylabel("requests running, target engine")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    sep = ": " if len(methods) <= 3 else "\n"
    fig.suptitle(f"{'; '.join(describe(m, st) for m in methods[1:])} vs full KV{sep}"
                 f"{res['requests']} x {st['prompt_tokens']} tokens, {st['max_tokens']} out, "
                 f"pool {st['pool_blocks_reported']} blocks", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--methods", type=parse_methods, default=f"{NONE},{SPECKV}",
                   help=f"comma-separated, of {','.join(method_names())}; {NONE} always runs "
                        "first")
    p.add_argument("--kv-budget", type=int, default=256, help="C of every KV method")
    p.add_argument("--prompt-budget", type=int, default=1024,
                   help="specpc's budget: prompt tokens kept (not KV entries)")
    p.add_argument("--cascade-prompt-budget", type=int, default=2048,
                   help="speckv_pc's SpecPC-stage prompt budget")
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
    # speckv_pc runs with its served default lookahead (20)
    n_pc = yaml.safe_load((REPO / f"configs/methods/{CASCADE}.yaml").read_text())["lookahead"]
    layers = None if args.draft_layers.lower() in ("full", "30") else int(args.draft_layers)
    methods = args.methods
    plans = {m: method_plan(m, args, layers) for m in methods}
    max_len = cdiv(P + max(M, args.lookahead, n_pc if CASCADE in methods else 0) + 256,
                   bs) * bs
    server_args = ["--target.kv_cache_memory_gib", f"{gib:.6f}", "--target.block_size", str(bs),
                   "--target.max_num_seqs", str(args.max_num_seqs),
                   "--target.max_model_len", str(max_len), *draft_server_args(layers)]
    settings: dict[str, Any] = {
        "prompt_tokens": P, "max_tokens": M, "kv_budget": C, "lookahead": args.lookahead,
        "draft_layers": args.draft_layers, "block_size": bs, "max_num_seqs": args.max_num_seqs,
        "kv_token_bytes": tb, "kv_cache_memory_gib": round(gib, 6), "pool_blocks_planned": blocks,
        "max_model_len": max_len, "server_args": server_args,
        "approx": plans[SPECKV]["approx"] if SPECKV in plans else None,
        "tokens_full": P + M,
        **{f"tokens_{m}": plans[m]["tokens"] for m in methods[1:]},
        **{f"blocks_per_request_{m}": plans[m]["blocks"] for m in methods},
        "methods": methods, "prompt_budget": args.prompt_budget,
        "cascade_prompt_budget": args.cascade_prompt_budget, "cascade_lookahead": n_pc,
        "approx_by_method": {m: plans[m]["approx"] for m in methods}}

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    with Server(server_args) as srv:
        before = load_snapshot()
        res = asyncio.run(bench(args, srv, tok, settings["approx_by_method"], settings))
    pool = int(settings["pool_blocks_reported"] or blocks)
    for m in methods:
        # KV blocks only; --max-num-seqs caps what can be observed at once
        settings[f"capacity_{m}"] = pool // settings[f"blocks_per_request_{m}"]
    res = {"description": __doc__.split("\n\n")[0], "machine": machine_info(),
           "command": " ".join(["python", "scripts/bench_speckv.py", *(argv or sys.argv[1:])]),
           "requests": args.requests, "server_startup_s": srv.startup_s,
           "load_before": before, "load_after": load_snapshot(), **res}
    by_method = {m: derive(res, m) for m in methods[1:]}
    res.update(ratios=by_method.get(SPECKV, {}), ratios_by_method=by_method)  # issue 5's keys
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print_table(res)
    png = args.out.with_suffix(".png")
    plot(res, png)
    print(f"\nwrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

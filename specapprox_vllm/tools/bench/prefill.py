"""Target prefill time of a 4k-token prompt: no compression vs SpecPC (prompt_budget 1024).

Why: issue 4's "done when" asks for the target's prefill time at budget 1024 versus no
compression, and the draft's time, on this machine, measured through the server as a client
sees it. TTFT is taken client-side with ``max_tokens=1`` and streaming (request sent -> first
chunk with text, as ``vllm bench serve`` defines it), so it is essentially one prefill plus the
HTTP/tokenisation overhead. For SpecPC the draft runs first, inside the same request, and
``usage.approx`` (final streamed chunk, ``stream_options.include_usage``) says how long it took,
so the TTFT splits into ``draft_ms``, ``select_ms`` and the target part
``TTFT - draft_ms - select_ms`` (which still includes the same fixed overhead as ``none``).

Prefix caching is on in both engines, so a repeated prompt would be served from cache. Every
request therefore gets its own needle case (distinct seed) *and* a unique random tag at the
start of the user message; only the chat template's system header (~30 tokens, the same for
every request) can hit the cache. ``none`` and ``specpc`` alternate run by run, so background
load drifts onto both alike, and one warm-up request of each method is discarded first.
Before timing, the script waits (``--wait-quiet`` s at most) until other processes use under
0.2 cores, and every run records ``foreign_cores``: the cores that processes other than our
server and this client used during that request (from ``/proc``), so a contended run shows.

Usage::

    python -m specapprox_vllm.tools.bench.prefill        # full draft, then a 12-layer draft
    python scripts/bench_prefill.py                       # the same, from a checkout
    python scripts/bench_prefill.py --draft-layers 12 --runs 5
    python scripts/bench_prefill.py --draft-layers full --base-url http://127.0.0.1:8000

Writes ``docs/results/bench_prefill.json`` and ``docs/results/bench_prefill.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm

from specapprox_vllm.policies import NonePolicy, SpecPCPolicy
from specapprox_vllm.tools.eval.needle import NeedleCase, make_needle_case
from specapprox_vllm.tools.eval.specpc_common import (
    DRAFT_MODES,
    MODEL_DIR,
    MODEL_NAME,
    REPO,
    TARGET_LAYERS,
    cpu_counters,
    foreign_cores,
    load_snapshot,
    machine_info,
    start_draft_server,
    wait_for_quiet,
)

#: The two methods compared (also the keys of the results): full attention and SpecPC.
NONE = NonePolicy.name
SPECPC = SpecPCPolicy.name


def tagged_messages(case: NeedleCase) -> list[dict[str, str]]:
    """The case's messages with a unique tag in front, so no engine can reuse a cached prefix."""
    msgs = [dict(m) for m in case.messages]
    msgs[-1]["content"] = f"[request {uuid.uuid4().hex[:12]}] " + msgs[-1]["content"]
    return msgs


def timed_request(client: openai.OpenAI, messages: list[dict[str, str]],
                  approx: dict[str, Any], pgid: int | None = None) -> dict[str, Any]:
    """One streaming request with ``max_tokens=1``; client-side TTFT plus ``usage.approx``,
    and how many cores other processes used meanwhile (``pgid``: our server's group)."""
    cpu0 = cpu_counters(pgid)
    t0 = time.perf_counter()
    ttft = first_chunk = None
    usage = None
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=1, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"approx": approx})
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:
            if first_chunk is None:
                first_chunk = now
            if ttft is None and chunk.choices[0].delta.content:
                ttft = now
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    # unknown for a server we did not start: its own CPU time would count as foreign
    foreign = foreign_cores(cpu0, cpu_counters(pgid)) if pgid is not None else None
    if ttft is None:  # a first token that decodes to "" (rare): fall back to the first chunk
        ttft = first_chunk if first_chunk is not None else end
    a = (usage.model_extra or {}).get("approx", {}) if usage is not None else {}
    ttft_ms = 1e3 * (ttft - t0)
    draft_ms = float(a.get("draft_ms") or 0.0)
    select_ms = float(a.get("select_ms") or 0.0)
    return {"ttft_ms": round(ttft_ms, 1), "e2e_ms": round(1e3 * (end - t0), 1),
            "draft_ms": draft_ms, "select_ms": select_ms,
            "target_ms": round(ttft_ms - draft_ms - select_ms, 1),
            "prompt_tokens": usage.prompt_tokens if usage is not None else None,
            "approx": a, "loadavg_1m": round(os.getloadavg()[0], 2),
            "foreign_cores": foreign}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians (robust to the odd run slowed by another process) and the spread."""
    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 1)

    t = [r["ttft_ms"] for r in runs]
    return {"n": len(runs), "ttft_ms": med("ttft_ms"), "draft_ms": med("draft_ms"),
            "select_ms": med("select_ms"), "target_ms": med("target_ms"),
            "ttft_min_ms": round(min(t), 1), "ttft_max_ms": round(max(t), 1),
            "foreign_cores_max": max((r["foreign_cores"] for r in runs
                                      if r.get("foreign_cores") is not None), default=None),
            "prompt_tokens": runs[0]["prompt_tokens"],
            "prompt_tokens_kept": runs[0]["approx"].get("prompt_tokens_kept")}


def bench_config(client: openai.OpenAI, tok: Any, args: argparse.Namespace,
                 start_layer: int, pgid: int | None) -> dict[str, Any]:
    """Warm-up, then ``args.runs`` alternating none/specpc requests on fresh 4k prompts."""
    specpc = {"method": SPECPC, "prompt_budget": args.budget, "start_layer": start_layer}
    none = {"method": NONE}
    warm = make_needle_case(tok, args.context_tokens, seed=10_000, depth=0.5)
    for approx in (none, specpc):
        timed_request(client, tagged_messages(warm), approx)
    out: dict[str, list[dict[str, Any]]] = {NONE: [], SPECPC: []}
    for i in tqdm(range(args.runs), desc=f"runs ({NONE} + {SPECPC})", unit="run"):
        case = make_needle_case(tok, args.context_tokens, seed=args.seed0 + i, depth=0.5)
        for name, approx in ((NONE, none), (SPECPC, specpc)):
            out[name].append({"seed": case.seed, **timed_request(
                client, tagged_messages(case), approx, pgid)})
    s_none, s_pc = summarize(out[NONE]), summarize(out[SPECPC])
    return {f"approx_{SPECPC}": specpc, "runs": out, NONE: s_none, SPECPC: s_pc,
            "ratio_none_over_specpc_target": round(s_none["ttft_ms"] / s_pc["target_ms"], 2),
            "ratio_none_over_specpc_total": round(s_none["ttft_ms"] / s_pc["ttft_ms"], 2)}


def print_table(results: dict[str, Any]) -> None:
    """One row per draft configuration (medians over the runs, milliseconds)."""
    head = (f"{'draft':<6} {'tokens':>7} {'kept':>5} {'TTFT none':>10} {'TTFT specpc':>12} "
            f"{'draft_ms':>9} {'select_ms':>9} {'target':>8} {'none/target':>11} "
            f"{'none/total':>10} {'foreign cores':>13}")
    print("\nPrefill (TTFT, max_tokens=1, streaming, client-side; medians in ms)")
    print(head)
    print("-" * len(head))
    for label, c in results["configs"].items():
        n, s = c[NONE], c[SPECPC]
        fs = [x for x in (n.get("foreign_cores_max"), s.get("foreign_cores_max")) if x is not None]
        foreign = f"{max(fs):.2f}" if fs else "n/a"
        print(f"{label:<6} {n['prompt_tokens']:>7} {s['prompt_tokens_kept']!s:>5} "
              f"{n['ttft_ms']:>10.0f} {s['ttft_ms']:>12.0f} {s['draft_ms']:>9.0f} "
              f"{s['select_ms']:>9.1f} {s['target_ms']:>8.0f} "
              f"{c['ratio_none_over_specpc_target']:>11.2f} "
              f"{c['ratio_none_over_specpc_total']:>10.2f} {foreign:>13}")


def plot(results: dict[str, Any], path: Path) -> None:
    """Bars per draft config: none TTFT next to SpecPC's TTFT stacked as draft/select/target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["configs"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    w = 0.36
    for i, label in enumerate(labels):
        c = results["configs"][label]
        n, s = c[NONE], c[SPECPC]
        ax.bar(i - w / 2, n["ttft_ms"] / 1e3, w, color="tab:grey",
               label=f"{NONE} (full prompt)" if i == 0 else None)
        ax.bar(i + w / 2, s["target_ms"] / 1e3, w, color="tab:blue",
               label=f"{SPECPC}: target" if i == 0 else None)
        ax.bar(i + w / 2, s["select_ms"] / 1e3, w, bottom=s["target_ms"] / 1e3,
               color="tab:green", label=f"{SPECPC}: select" if i == 0 else None)
        ax.bar(i + w / 2, s["draft_ms"] / 1e3, w,
               bottom=(s["target_ms"] + s["select_ms"]) / 1e3, color="tab:orange",
               label=f"{SPECPC}: draft" if i == 0 else None)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f"draft {lab}" for lab in labels])
    ax.set_ylabel("median TTFT (s), max_tokens=1")
    tokens = next(iter(results["configs"].values()))[NONE]["prompt_tokens"]
    ax.set_title(f"Prefill of a {tokens}-token prompt, prompt_budget {results['budget']}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draft-layers", default="full,12",
                   help="comma list: 'full' and/or k (server started with "
                        "--draft.num_layers k); default full,12")
    p.add_argument("--base-url", help="use this running server (one --draft-layers entry)")
    p.add_argument("--draft-mode", choices=("auto", *DRAFT_MODES), default="auto",
                   help="k-layer drafts: num_layers = --draft.num_layers k; checkpoint = "
                        "--draft.model <truncated copy>; auto = the first, else the second")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--context-tokens", type=int, default=4000)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--seed0", type=int, default=100, help="first needle seed of the runs")
    p.add_argument("--wait-quiet", type=float, default=600.0,
                   help="seconds to wait, before timing, until processes other than our "
                        "server use under 0.2 cores")
    p.add_argument("--resume", action="store_true", help="keep configs already in --out")
    p.add_argument("--out", type=Path, default=REPO / "docs/results/bench_prefill.json")
    p.add_argument("--plot", type=Path, default=REPO / "docs/results/bench_prefill.png")
    args = p.parse_args(argv)

    drafts: list[int | None] = [None if d.strip().lower() in ("full", str(TARGET_LAYERS))
                                else int(d)
                                for d in args.draft_layers.split(",") if d.strip()]
    if args.base_url and len(drafts) != 1:
        p.error("--base-url needs exactly one --draft-layers entry (the draft of that server)")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    results: dict[str, Any] = {
        "description": "client-side TTFT (max_tokens=1, streaming) of a needle prompt: "
                       f"method {NONE} vs {SPECPC}; target = TTFT - draft_ms - select_ms",
        "machine": machine_info(), "context_tokens": args.context_tokens,
        "budget": args.budget, "runs": args.runs,
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "configs": {},
    }
    if args.resume and args.out.exists():
        results["configs"] = json.loads(args.out.read_text()).get("configs", {})

    for layers in drafts:
        label = "full" if layers is None else f"k={layers}"
        if label in results["configs"]:
            print(f"[{label}] already measured (--resume), skipped")
            continue
        # start_layer 8 (default) needs a draft of more than 8 layers
        start = 8 if layers is None or layers > 8 else max(0, layers // 2)
        print(f"\n[{label}] start_layer {start}", flush=True)
        srv, mode, fallback = start_draft_server(layers, args.draft_mode, args.base_url)
        try:
            # an external server's idle CPU would count as foreign: no waiting for it
            quiet = (wait_for_quiet(srv.pgid, args.wait_quiet) if srv.pgid is not None
                     else None)
            before = load_snapshot()
            print(f"  load before: {before['loadavg_1_5_15']} (quiet: {quiet})", flush=True)
            client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused",
                                   timeout=1800, max_retries=0)
            cfg = bench_config(client, tok, args, start, srv.pgid)
            cfg.update({"draft_layers": layers or TARGET_LAYERS, "start_layer": start,
                        "draft_mode": mode, "draft_mode_fallback_reason": fallback,
                        "machine": machine_info(),
                        "server_args": srv.extra_args, "machine_was_quiet": quiet,
                        "load_before": before, "load_after": load_snapshot()})
        finally:
            srv.stop()
        results["configs"][label] = cfg
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print_table(results)

    print_table(results)
    plot(results, args.plot)
    print(f"\nwrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cost curves of every method, side by side in one run per table (issue 18).

Three tables, each from one server and one run, every method measured against full attention
(the first method) on fresh prompts (distinct needle cases with a unique tag, so no prefix
cache can share them):

* ``--mode lengths``: one request at a time for each prompt length; TTFT and decode tok/s
  (output tokens after the first / time after the first) per method, medians over
  ``--runs``, and a least-squares fit ``log cost = a + b log L`` (``b``: the exponent) of
  each, and of the parts ``usage.approx`` splits out (draft, target scoring, selection).
* ``--mode output``: ``--concurrency`` concurrent prompts of ``--prompt-tokens`` for each
  output length; output tok/s (all output tokens / wall time), TTFT median, decode-phase tok/s
  (output tokens after each first token / from the first first token to the last token), how
  many were compressed (``usage.approx.applied``) and how many fell back; where each method
  starts paying off.
* ``--mode resident``: more concurrent requests than full KV can hold in the server's pool
  (``--server-arg=--target.kv_cache_memory_gib`` ...); the peak of requests in the target's
  running batch (``/metrics``), of requests between their first and last token (client side)
  and of KV blocks used, observed (docs/results.md sets them beside what the pool holds by
  arithmetic: the engine log's "KV cache size").

The server is ``specapprox-serve --config CONFIG`` with ``--server-arg``s on top, so the same
script measures the default one-model server and ``configs/large-target.yaml``.

Usage::

    python -m specapprox_vllm.tools.bench.costs --mode lengths --lengths 1024,2048,4096,8192
    python -m specapprox_vllm.tools.bench.costs --mode output --max-tokens 128,384,1024
    python -m specapprox_vllm.tools.bench.costs --mode output --config configs/large-target.yaml
    python -m specapprox_vllm.tools.bench.costs --mode resident --requests 24

Writes ``--out`` (JSON: the command, commit, machine, every request) and a PNG beside it, and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from transformers import AutoTokenizer

from specapprox_vllm.policies import get_policy, method_names
from specapprox_vllm.tools.bench.prefill import tagged_messages
from specapprox_vllm.tools.bench.run_stats import poll_metrics, summarize
from specapprox_vllm.tools.eval.needle import make_needle_case
from specapprox_vllm.tools.eval.specpc_common import MODEL_DIR, REPO, Server, machine_info
from specapprox_vllm.tools.loadtest.client import RunConfig, run_setting
from specapprox_vllm.tools.loadtest.prompts import Prompt

DEFAULT_METHODS = ",".join(method_names())  # every registered method; "none" is the first


def approx_body(setting: str, args: argparse.Namespace) -> dict[str, Any]:
    """The ``approx`` object of a setting at this run's budgets (from the policy's facts).
    A setting is a method name, optionally with ``+key=value`` overrides
    (``speckv+lookahead=16``)."""
    method, *overrides = setting.split("+")
    policy = get_policy(method)
    body: dict[str, Any] = {"method": method}
    if policy.compresses_kv:
        body["kv_budget"] = args.kv_budget
    if policy.compresses_prompt:
        body["prompt_budget"] = (args.cascade_prompt_budget if policy.compresses_kv
                                 else args.prompt_budget)
    for item in overrides:
        key, _, value = item.partition("=")
        body[key] = yaml.safe_load(value)
    return body


def prompts(tok: Any, n: int, length: int, out_len: int, seed: int) -> list[Prompt]:
    return [Prompt(None, tagged_messages(make_needle_case(tok, length, seed=seed + i,
                                                           depth=(i % 5) / 4)), out_len)
            for i in range(n)]


async def run_cell(base_url: str, model: str, approx: dict[str, Any], ps: list[Prompt],
                   concurrency: int, max_tokens: int, label: str) -> dict[str, Any]:
    """One (method, shape) cell: the requests, /metrics polled meanwhile, the summary."""
    cfg = RunConfig(root_url=base_url, backend="chat", model=model, ignore_eos=True,
                    max_concurrency=concurrency)
    samples: list[dict[str, float]] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=None, trust_env=False) as client:
        t0 = time.perf_counter()
        poller = asyncio.create_task(poll_metrics(client, f"{base_url}/metrics", t0, 0.5,
                                                  samples, stop))
        records, wall = await run_setting(client, cfg, ps, label, approx)
        stop.set()
        await poller
    out = summarize(records, wall, samples, max_tokens)
    approxes = [r.approx or {} for r in records if r.success]
    out["fallbacks"] = sum(1 for a in approxes if a.get("fallback"))
    out["lookahead_source"] = sorted({str(a.get("lookahead_source")) for a in approxes})
    out["requests"] = [r.to_json() for r in records]
    out["steady_decode_tok_s"] = steady_decode(out["requests"])
    return out


def steady_decode(requests: list[dict[str, Any]]) -> float | None:
    """Output tokens per second once every request has its first token: the decode rate
    with all requests resident and no prefill in the way (token times from the streamed
    chunks: first token at ``start + ttft``, then the inter-token gaps)."""
    ok = [r for r in requests if r.get("success") and r.get("ttft") is not None]
    if not ok:
        return None
    t0 = max(r["start"] + r["ttft"] for r in ok)
    t1 = max(r["start"] + r["last_token"] for r in ok)
    n = 0
    for r in ok:
        t = r["start"] + r["ttft"]
        for gap in r.get("itl") or []:
            t += gap
            n += t > t0
    return round(n / (t1 - t0), 3) if t1 > t0 else None


def fit(xs: list[float], ys: list[float]) -> dict[str, float] | None:
    """Least squares of log y on log x: the exponent, and y per 1k at the largest x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y and y > 0]
    if len(pts) < 2:
        return None
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return {"exponent": round(b, 3), "per_1k_at_max": round(1e3 * ys[-1] / xs[-1], 4)}


async def measure(args: argparse.Namespace, base_url: str, model: str) -> dict[str, Any]:
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    methods = args.methods
    cells: list[dict[str, Any]] = []
    if args.mode == "lengths":
        shapes = [(n, args.max_tokens[0], 1, args.runs) for n in args.lengths]
    elif args.mode == "output":
        shapes = [(args.prompt_tokens, m, args.concurrency, args.concurrency)
                  for m in args.max_tokens]
    else:
        shapes = [(args.prompt_tokens, args.max_tokens[0], args.requests, args.requests)]
    seed = args.seed0
    for length, out_len, conc, n in shapes:
        for method in methods:  # side by side: every method on the same shape, in turn
            seed += 1000
            label = f"{method} L={length} out={out_len} x{conc}"
            print(f"[costs] {label}: {n} request(s)", flush=True)
            cell = await run_cell(base_url, model, approx_body(method, args),
                                  prompts(tok, n, length, out_len, seed), conc, out_len, label)
            cell.update(method=method, prompt_len=length, max_tokens=out_len, concurrency=conc)
            print(f"[costs]   output {cell['output_tok_s']} tok/s, ttft p50 {cell['ttft_p50_s']}"
                  f" s, decode {cell['decode_tok_s']} tok/s, compressed "
                  f"{cell['approx_applied']}/{cell['requests_ok']}, fallbacks "
                  f"{cell['fallbacks']}", flush=True)
            cells.append(cell)
    return {"cells": cells}


def ratios(cells: list[dict[str, Any]], ref: str) -> None:
    """Each cell's figures over full attention's on the same shape."""
    base = {(c["prompt_len"], c["max_tokens"]): c for c in cells if c["method"] == ref}
    for c in cells:
        b = base.get((c["prompt_len"], c["max_tokens"]))
        if b is None:
            continue
        for key in ("output_tok_s", "decode_tok_s", "ttft_p50_s", "per_request_decode_tok_s_"
                    "median", "steady_decode_tok_s"):
            if c.get(key) and b.get(key):
                c[f"{key}_vs_{ref}"] = round(c[key] / b[key], 3)


FITTED = (("ttft", "TTFT s"), ("decode_s_per_token", "decode s/token"),
          ("draft_ms", "draft ms"), ("score_ms", "score ms"), ("select_ms", "select ms"))


def fits(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method, the fitted exponent of each cost against the prompt length: TTFT, decode
    time per token, and the parts ``usage.approx`` reports (draft, target scoring, select)."""
    out = {}
    for m in dict.fromkeys(c["method"] for c in cells):
        mine = [c for c in cells if c["method"] == m]
        xs = [float(c["prompt_tokens_median"] or c["prompt_len"]) for c in mine]
        ys = {"ttft": [c["ttft_p50_s"] for c in mine],
              "decode_s_per_token": [1 / c["per_request_decode_tok_s_median"]
                                     if c["per_request_decode_tok_s_median"] else 0
                                     for c in mine]}
        for key in ("draft_ms", "score_ms", "select_ms"):
            ys[key] = [c.get(f"{key}_median") or 0 for c in mine]
        out[m] = {key: fit(xs, ys[key]) for key, _ in FITTED}
    return out


def fits_table(res: dict[str, Any]) -> str:
    """Markdown: each cost's fitted exponent (1 linear, 2 quadratic) and its value per 1k
    prompt tokens at the longest prompt."""
    head = "".join(f" {name}: exponent | per 1k |" for _, name in FITTED)
    lines = [f"| method |{head}", "|" + "---|" * (1 + 2 * len(FITTED))]
    for m, f in res["fits"].items():
        figs = "".join(f" {f[k]['exponent']} | {f[k]['per_1k_at_max']} |" if f.get(k)
                       else " | |" for k, _ in FITTED)
        lines.append(f"| {m} |{figs}")
    return "\n".join(lines)


COLUMNS = (("output tok/s", "output_tok_s"), ("TTFT p50 s", "ttft_p50_s"),
           ("decode tok/s per request", "per_request_decode_tok_s_median"),
           ("decode-phase tok/s", "decode_tok_s"), ("steady decode tok/s", "steady_decode_tok_s"))


def table(res: dict[str, Any]) -> str:
    """Markdown: each figure, and its ratio to the reference (the first method)."""
    ref = res["methods"][0]
    head = "".join(f" {name} | vs {ref} |" for name, _ in COLUMNS)
    lines = [f"| method | prompt | out | conc |{head} compressed | fallbacks | peak running |",
             "|" + "---|" * (4 + 2 * len(COLUMNS) + 3)]
    for c in res["cells"]:
        figs = "".join(f" {c.get(k)} | {c.get(f'{k}_vs_{ref}', '')} |" for _, k in COLUMNS)
        lines.append(f"| {c['method']} | {c['prompt_tokens_median']} | {c['max_tokens']} | "
                     f"{c['concurrency']} |{figs} {c['approx_applied']}/{c['requests_ok']} | "
                     f"{c['fallbacks']} | {c['peak_running']} |")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = {"lengths": "prompt_tokens_median", "output": "max_tokens",
             "resident": "prompt_tokens_median"}[res["mode"]]
    last = (("per_request_decode_tok_s_median", "decode tok/s per request")
            if res["mode"] == "lengths" else ("peak_running", "peak running"))
    panels = (("ttft_p50_s", "TTFT p50 (s)"), ("output_tok_s", "output tok/s"),
              ("decode_tok_s", "decode-phase tok/s"), last)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for m in res["methods"]:
            pts = [(c[x_key], c[key]) for c in res["cells"] if c["method"] == m
                   and c.get(key) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
        ax.set_title(title)
        ax.set_xlabel("prompt tokens" if x_key != "max_tokens" else "output tokens")
        if res["mode"] == "lengths":
            ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{res['mode']}: {res['server']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--mode", choices=("lengths", "output", "resident"), default="output")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra specapprox-serve flag, e.g. --server-arg=--target.max_model_len"
                        " --server-arg=32768 (repeatable)")
    p.add_argument("--base-url", help="measure a running server instead of starting one")
    p.add_argument("--methods", default=DEFAULT_METHODS.split(","), type=lambda s: s.split(","),
                   help="comma-separated settings (a method, or method+key=value+...); the "
                        "first is the reference of every ratio")
    p.add_argument("--lengths", type=ints, default=[1024, 2048, 4096, 8000])
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens", type=ints, default=[128])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=24, help="--mode resident")
    p.add_argument("--runs", type=int, default=2, help="--mode lengths: prompts per length")
    p.add_argument("--kv-budget", type=int, default=256)
    p.add_argument("--prompt-budget", type=int, default=1024)
    p.add_argument("--cascade-prompt-budget", type=int, default=1024)
    p.add_argument("--seed0", type=int, default=7000)
    p.add_argument("--out", type=Path, default=REPO / "docs/results/costs.json")
    p.add_argument("--recompute", action="store_true",
                   help="derived figures, table and plot again from --out (no server)")
    args = p.parse_args(argv)
    if args.recompute:
        res = json.loads(args.out.read_text())
        for c in res["cells"]:
            c["steady_decode_tok_s"] = steady_decode(c["requests"])
        return report(res, args.out)
    for m in args.methods:
        approx_body(m, args)  # an unknown name fails here, not after a server start
    server = Server(["--config", args.config, *args.server_arg], base_url=args.base_url)
    server.start()
    try:
        model = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
        t0 = time.time()
        res = asyncio.run(measure(args, server.base_url, model))
    finally:
        server.stop()
    res.update(mode=args.mode, methods=args.methods, server=" ".join(
        ["specapprox-serve --config", args.config, *args.server_arg]),
        command=" ".join(["python -m specapprox_vllm.tools.bench.costs", *(argv or sys.argv[1:])]),
        commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True).stdout.strip(),
        machine=machine_info(), minutes=round((time.time() - t0) / 60, 1))
    return report(res, args.out)


def report(res: dict[str, Any], out: Path) -> int:
    """Ratios, fits, JSON, markdown table and PNG of a finished run."""
    ratios(res["cells"], res["methods"][0])
    if res["mode"] == "lengths":
        res["fits"] = fits(res["cells"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    plot(res, out.with_suffix(".png"))
    md = table(res)
    if res.get("fits"):
        md += "\n\nFitted against the prompt length (log cost = a + b log L; b):\n\n" + \
            fits_table(res)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Accuracy of every method against full attention on RULER-style tasks, over HTTP.

Why: a user choosing a method and a budget needs to know how much accuracy is kept. This
serves the same deterministic cases (:mod:`specapprox_vllm.tools.eval.ruler`) with every setting
(method x budget) through any OpenAI-compatible server with our ``approx`` extension, scores
them with RULER's string match, drops (task, length) cells where full attention scores below
``--min-full`` (and says so), and reports the mean accuracy per setting, per task and per
length.

The sweep runs in two phases: full attention (method ``none``) on every case first, which fixes the
calibration; then the other settings only on the cells it kept (a dropped cell's numbers
would not enter the table anyway). Within a case the settings run one at a time, so the
draft's prefix cache serves the shared prompt; cases run ``--concurrency`` at a time.
Records are appended to ``<out>.records.jsonl`` as they finish, and ``--resume`` skips those
already there, so a long sweep can be stopped and continued.

Usage::

    python -m specapprox_vllm.tools.eval.accuracy     # starts its own server
    python scripts/eval_accuracy.py                   # the same, from a checkout
    python scripts/eval_accuracy.py --base-url http://127.0.0.1:8000 # or uses yours
    python scripts/eval_accuracy.py --resume      # continue a stopped sweep
    python scripts/eval_accuracy.py --report-only # table and plots from the records so far
    python scripts/eval_accuracy.py --tasks niah_single,qa --lengths 1024 --samples 3 \\
        --out /tmp/acc.json                                          # smoke

Writes ``docs/results/accuracy.json`` (``--out``), the table as ``accuracy.md`` (what
``docs/results.md`` shows), ``accuracy_budget.png`` and ``accuracy_length.png`` beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from specapprox_vllm.policies import (
    SnapKVPolicy,
    SpecKVPCPolicy,
    SpecKVPolicy,
    SpecPCPolicy,
    StreamingLLMPolicy,
    get_policy,
    method_names,
)
from specapprox_vllm.tools.eval.ruler import TASKS, EvalCase, make_case
from specapprox_vllm.tools.eval.specpc_common import (
    REPO,
    Server,
    add_client_args,
    draft_server_args,
    machine_info,
    save_result,
)
from specapprox_vllm.tools.eval.sweep import (
    REFERENCE,
    Setting,
    int_list,
    markdown_table,
    settings_from_flags,
    summarize,
)

DEFAULT_TASKS = "niah_single,niah_multikey,niah_multivalue,qa"
#: The methods swept by default (the reference is always added): the baselines, then the
#: draft-based methods; the order is that of the published table (docs/results/accuracy.md).
DEFAULT_METHODS = ",".join(p.name for p in (StreamingLLMPolicy, SnapKVPolicy, SpecKVPolicy,
                                            SpecPCPolicy, SpecKVPCPolicy))


def record_key(r: dict[str, Any]) -> tuple[str, str, int, int]:
    return (r["setting"], r["task"], r["length"], r["seed"])


def usable(r: dict[str, Any]) -> bool:
    """A record that measures its setting: served without error, and not a draft-failure
    fallback to full attention (``usage.approx.fallback``), which measured ``none`` instead.
    Unusable records stay in the JSONL but are served again by ``--resume``."""
    return "error" not in r and not (r.get("approx") or {}).get("fallback")


async def serve_case(client: Any, model: str, case: EvalCase, todo: list[Setting],
                     cascade_pc: int, sink: Any, bar: Any) -> None:
    for setting in todo:
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"setting": setting.label, "method": setting.method,
                               "budget": setting.budget,
                               "max_lookahead": setting.max_lookahead, "task": case.task,
                               "length": case.length, "seed": case.seed,
                               "prompt_tokens": case.prompt_tokens}
        try:
            resp = await client.chat.completions.create(
                model=model, messages=case.messages, max_tokens=case.max_tokens,
                temperature=0.0, extra_body={"approx": setting.approx(cascade_pc)})
            text = resp.choices[0].message.content or ""
            rec.update(score=case.score(text), text=text[:200],
                       approx=(resp.usage.model_extra or {}).get("approx"))
        except Exception as exc:  # noqa: BLE001 - recorded, kept out of the means, retried
            # by --resume
            rec.update(score=None, error=f"{type(exc).__name__}: {exc}"[:300])
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        sink(rec)
        bar.update(1)


async def run(args: argparse.Namespace, base_url: str, out: Path) -> list[dict[str, Any]]:
    import openai
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    grid = settings_from_flags(args)
    jsonl = out.with_suffix(".records.jsonl")
    done: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    if args.resume and jsonl.exists():
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            if usable(r):  # failed or fallen-back requests are served again
                done[record_key(r)] = r
    elif jsonl.exists():
        jsonl.unlink()
    records = list(done.values())
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=args.api_key or "unused",
                                max_retries=0, timeout=args.timeout)
    full = [s for s in grid if s.is_reference]
    rest = [s for s in grid if not s.is_reference]
    with jsonl.open("a") as fh:
        def sink(rec: dict[str, Any]) -> None:
            records.append(rec)
            fh.write(json.dumps(rec) + "\n")
            fh.flush()

        await _serve_phase("full attention (calibration)", args, tok, client, full, done,
                           None, sink)
        ok = [r for r in records if usable(r)]
        kept = {tuple(c) for c in summarize(ok, args.min_full)["kept_cells"]}
        print(f"calibration keeps {len(kept)} cells: {sorted(kept)}", flush=True)
        await _serve_phase("approximations", args, tok, client, rest, done, kept, sink)
    return records


async def _serve_phase(name: str, args: argparse.Namespace, tok: Any, client: Any,
                       grid: list[Setting], done: dict[Any, Any],
                       cells: set[tuple[str, int]] | None, sink: Any) -> None:
    """Serve ``grid`` on every case of ``cells`` (None: all) not already in ``done``."""
    from tqdm import tqdm

    jobs = []
    # sample-major order: a sweep stopped early still covers every cell evenly
    for i in range(args.samples):
        seed = args.seed0 + i
        for task in args.tasks.split(","):
            for length in int_list(args.lengths):
                if cells is not None and (task, length) not in cells:
                    continue
                todo = [s for s in grid if (s.label, task, length, seed) not in done]
                if todo:
                    jobs.append((make_case(task, tok, length, seed), todo))
    total = sum(len(t) for _, t in jobs)
    print(f"{name}: {len(grid)} settings, {len(jobs)} cases to serve, {total} requests",
          flush=True)
    gate = asyncio.Semaphore(args.concurrency)
    with tqdm(total=total, unit="req", file=sys.stdout) as bar:
        async def one(case: EvalCase, todo: list[Setting]) -> None:
            async with gate:
                await serve_case(client, args.model, case, todo, args.cascade_prompt_budget,
                                 sink, bar)

        await asyncio.gather(*[one(c, t) for c, t in jobs])


def print_table(summary: dict[str, Any]) -> None:
    tasks = sorted({t for t, _ in summary["kept_cells"]})
    lengths = sorted({n for _, n in summary["kept_cells"]})
    head = f"{'setting':<18}{'mean':>7}" + "".join(f"{t[:12]:>13}" for t in tasks) + "".join(
        f"{n:>7}" for n in lengths)
    print("\n" + head + "\n" + "-" * len(head))
    for label, row in summary["settings"].items():
        cols = [row["by_task"].get(t) for t in tasks] + [row["by_length"].get(str(n))
                                                         for n in lengths]
        print(f"{label:<18}{_fmt(row['mean'], 7)}" + "".join(
            _fmt(v, 13) for v in cols[: len(tasks)]) + "".join(
            _fmt(v, 7) for v in cols[len(tasks):]))
    for d in summary["dropped_cells"]:
        print(f"dropped: {d['task']} @ {d['length']} tokens (full attention {d['full']:.2f} "
              f"< {summary['min_full']})")
    print(f"samples per cell: >= {summary['min_samples_per_cell']}")


def plot(summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["settings"]
    full = rows.get(REFERENCE, {}).get("mean")
    # the swept names (a method, or method+key=value) in the order of the rows; each on the
    # axis of the budget its method sweeps
    swept = [m for m in dict.fromkeys(k.split("@")[0] for k in rows if "@" in k)
             if m.split("+")[0] in method_names()]
    kv = [m for m in swept if get_policy(m.split("+")[0]).compresses_kv]
    prompt = [m for m in swept if m not in kv
              and get_policy(m.split("+")[0]).compresses_prompt]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, methods, xlabel in ((axes[0], kv, "KV budget (entries)"),
                                (axes[1], prompt, "prompt budget (tokens)")):
        for m in methods:
            pts = sorted((int(k.split("@")[1]), v["mean"]) for k, v in rows.items()
                         if k.startswith(m + "@") and v["mean"] is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=m)
        if full is not None:
            ax.axhline(full, color="grey", ls="--", label="full attention")
        ax.set(xscale="log", xlabel=xlabel, ylabel="accuracy (kept cells)", ylim=(0, 1.05))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy vs budget (RULER-style tasks, SmolLM2-135M)")
    fig.tight_layout()
    fig.savefig(out.with_name(out.stem + "_budget.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, row in rows.items():
        pts = sorted((int(n), v) for n, v in row["by_length"].items() if v is not None)
        if pts and (label == REFERENCE or label.endswith(("@256", "@1024"))):
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set(xlabel="prompt length (tokens)", ylabel="accuracy (kept cells)", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_name(out.stem + "_length.png"), dpi=110)
    plt.close(fig)


def _fmt(v: float | None, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_client_args(p)
    p.add_argument("--draft-layers", default="full", help="k or 'full' (own server only)")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"of {','.join(TASKS)}")
    p.add_argument("--lengths", default="1024,2048,3072")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, of {','.join(method_names())} (default "
                        f"{DEFAULT_METHODS}; full attention is always served first)")
    p.add_argument("--kv-budgets", default="128,256,512")
    p.add_argument("--prompt-budgets", default="512,1024,2048")
    p.add_argument("--cascade-prompt-budget", type=int, default=2048)
    p.add_argument("--max-lookahead", type=int, default=None,
                   help="cap on SpecKV's and the cascade's lookahead n (default: the "
                        "method's); such rows are labelled method+max_lookahead=N@budget")
    p.add_argument("--min-full", type=float, default=0.5)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--resume", action="store_true", help="skip records already served")
    p.add_argument("--report-only", action="store_true",
                   help="no server: summarize the records already in <out>.records.jsonl")
    p.add_argument("--out", type=Path, default=REPO / "docs/results/accuracy.json")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    layers = None if args.draft_layers == "full" else int(args.draft_layers)
    t0 = time.time()
    server_args = draft_server_args(layers) + ["--target.max_model_len", "8192"]
    if args.report_only:
        jsonl = args.out.with_suffix(".records.jsonl")
        records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    else:
        with Server(server_args, base_url=args.base_url) as srv:
            records = asyncio.run(run(args, srv.base_url, args.out))
    errors = [r for r in records if not usable(r)]
    summary = summarize([r for r in records if usable(r)], args.min_full)
    result = {"command": " ".join(sys.argv), "machine": machine_info(), "args": vars(args)
              | {"out": str(args.out)}, "draft_layers": args.draft_layers,
              "wall_s": round(time.time() - t0, 1), "requests": len(records),
              "errors": len(errors), "summary": summary}
    print_table(summary)
    save_result(args.out, result, markdown_table(summary), errors)
    plot(summary, args.out)
    print(f"wrote {args.out} and its plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

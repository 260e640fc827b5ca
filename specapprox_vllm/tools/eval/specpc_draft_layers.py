"""SpecPC needle accuracy over HTTP as a function of the draft: full SmolLM2 vs its first k layers.

Why: issue 4 asks how accurate SpecPC is when the draft is the target's own first k layers
(``--draft.num_layers k``), which is the only way a one-model machine gets
a draft cheaper than the target. Everything goes through the public API with the ``openai``
SDK, exactly as a user would call it, so the numbers include the real draft engine, the
attention-capture backend and the selection path of the server.

For each draft configuration a server is started (``specapprox-serve --draft.num_layers k``;
the full draft is the default config), then every needle case (``make_needle_case``, ~3000
tokens, seeds x depths) is sent with ``approx: {"method": "specpc", "prompt_budget": C,
"start_layer": s}``, greedy, ``max_tokens`` 24; a reply is correct iff it contains
``case.answer``. ``start_layer`` is 8 (the SpecPC default) for the full draft and k > 8; a draft
of k <= 8 layers would have no layer to score with, so it gets ``--small-start-layer`` (4 by
default, i.e. layers 4..7 score). Full attention (``method: none``) on the same cases is the
reference; the target is the same model in every configuration, so it is measured once, on
the first server (``--reference-every-config`` repeats it on each).

Usage::

    python -m specapprox_vllm.tools.eval.specpc_draft_layers       # full, 8, 12, 16; C = 1024, 512
    python scripts/eval_specpc_draft_layers.py                      # the same, from a checkout
    python scripts/eval_specpc_draft_layers.py --drafts 12 --base-url http://127.0.0.1:8000
        # an already running server whose draft is 12 layers (it is not stopped)

Writes ``docs/results/specpc_draft_layers.json`` (after every configuration, so a long run that
dies keeps what it finished; ``--resume`` skips configurations already there) and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm

from specapprox_vllm.policies import DEFAULT_METHOD, SpecPCPolicy
from specapprox_vllm.tools.eval.needle import NeedleCase, make_needle_case
from specapprox_vllm.tools.eval.specpc_common import (
    DRAFT_MODES,
    MODEL_DIR,
    MODEL_NAME,
    REPO,
    TARGET_LAYERS,
    load_snapshot,
    machine_info,
    start_draft_server,
)

SPECPC = SpecPCPolicy.name
#: Full attention, the reference (measured once, on the first server).
REFERENCE = DEFAULT_METHOD
DEFAULT_START_LAYER = 8


def parse_drafts(text: str) -> list[int | None]:
    """``"full,8,12"`` -> ``[None, 8, 12]`` (None = the full model as a separate draft)."""
    out: list[int | None] = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if tok in ("full", str(TARGET_LAYERS)):
            out.append(None)
        elif tok:
            out.append(int(tok))
    return out


def draft_label(layers: int | None) -> str:
    return "full" if layers is None else f"k={layers}"


def start_layer_for(layers: int | None, small_start: int) -> int:
    """SpecPC's start layer for a draft: the default 8 unless the draft has <= 8 layers."""
    if layers is not None and layers <= DEFAULT_START_LAYER:
        return small_start
    return DEFAULT_START_LAYER


def build_cases(context_tokens: int, seeds: list[int], depths: list[float]) -> list[NeedleCase]:
    """The needle suite (deterministic from seeds and depths; same cases for every config)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    return [make_needle_case(tok, context_tokens, seed=s, depth=d)
            for s in seeds for d in depths]


def ask(client: openai.OpenAI, case: NeedleCase, approx: dict[str, Any],
        max_tokens: int) -> dict[str, Any]:
    """One greedy chat request; the record of what came back (errors are kept, not raised,
    so that one server bug does not lose a whole configuration)."""
    t0 = time.perf_counter()
    try:
        r = client.chat.completions.create(
            model=MODEL_NAME, messages=case.messages, max_tokens=max_tokens, temperature=0,
            extra_body={"approx": approx})
    except openai.APIError as e:
        return {"seed": case.seed, "depth": case.depth, "correct": False,
                "error": f"{type(e).__name__}: {getattr(e, 'status_code', '')} {e}"[:500],
                "latency_s": round(time.perf_counter() - t0, 3)}
    text = r.choices[0].message.content or ""
    extra = (r.usage.model_extra or {}) if r.usage is not None else {}
    return {"seed": case.seed, "depth": case.depth, "answer": case.answer, "reply": text,
            "correct": case.answer in text,
            "prompt_tokens": r.usage.prompt_tokens if r.usage else None,
            "approx": extra.get("approx"), "latency_s": round(time.perf_counter() - t0, 3)}


def run_setting(client: openai.OpenAI, cases: list[NeedleCase], approx: dict[str, Any],
                max_tokens: int, desc: str) -> dict[str, Any]:
    """All cases with one ``approx`` object; accuracy and the per-case records."""
    recs = [ask(client, c, approx, max_tokens) for c in tqdm(cases, desc=desc, unit="case")]
    ok = [r for r in recs if "error" not in r]
    kept = [r["approx"]["prompt_tokens_kept"] for r in ok if r.get("approx")]
    draft_ms = [r["approx"]["draft_ms"] for r in ok if r.get("approx")]
    return {"approx": approx, "n": len(recs), "errors": len(recs) - len(ok),
            "correct": sum(r["correct"] for r in recs),
            "accuracy": sum(r["correct"] for r in recs) / len(recs),
            "mean_prompt_tokens_kept": sum(kept) / len(kept) if kept else None,
            "mean_draft_ms": sum(draft_ms) / len(draft_ms) if draft_ms else None,
            "cases": recs}


def print_table(results: dict[str, Any], budgets: list[int]) -> None:
    """Accuracy per draft configuration and budget, next to the full-attention reference."""
    ref = results.get("reference")
    ref_txt = f"{ref['correct']}/{ref['n']}" if ref else "n/a"
    head = f"{'draft':<8} {'layers':>6} {'start':>5} " + " ".join(
        f"{'C=' + str(b):>12}" for b in budgets) + f" {'draft ms (C=' + str(budgets[0]) + ')':>18}"
    print(f"\nSpecPC needle accuracy (full attention, method {REFERENCE}: {ref_txt})")
    print(head)
    print("-" * len(head))
    for label, cfg in results["configs"].items():
        cells = []
        for b in budgets:
            s = cfg[SPECPC].get(str(b))
            cells.append(f"{s['correct']:>3}/{s['n']:<3} {100 * s['accuracy']:>4.0f}%"
                         if s else f"{'-':>12}")
        s0 = cfg[SPECPC].get(str(budgets[0]))
        dms = f"{s0['mean_draft_ms']:.0f}" if s0 and s0["mean_draft_ms"] is not None else "-"
        print(f"{label:<8} {cfg['draft_layers']:>6} {cfg['start_layer']:>5} "
              + " ".join(f"{c:>12}" for c in cells) + f" {dms:>18}")


def plot(results: dict[str, Any], budgets: list[int], path: Path) -> None:
    """Accuracy vs draft layers (the full draft is drawn at 30 = all of SmolLM2's layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    every = sorted(results["configs"].values(), key=lambda c: c["draft_layers"])
    cfgs = [c for c in every if not c.get("forced_start_layer")]
    for i, b in enumerate(budgets):
        color = f"C{i}"
        pts = [(c["draft_layers"], 100 * c[SPECPC][str(b)]["accuracy"])
               for c in cfgs if str(b) in c[SPECPC]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", color=color,
                    label=f"SpecPC, prompt_budget {b}")
        # runs with a forced start_layer: separate markers, labelled with it
        for c in every:
            if c.get("forced_start_layer") and str(b) in c[SPECPC]:
                y = 100 * c[SPECPC][str(b)]["accuracy"]
                ax.scatter([c["draft_layers"]], [y], marker="x", color=color, zorder=3)
                ax.annotate(f"start_layer {c['start_layer']}", (c["draft_layers"], y),
                            textcoords="offset points", xytext=(5, -10), fontsize=7,
                            color=color)
    if any(c.get("forced_start_layer") for c in every):
        ax.scatter([], [], marker="x", color="black", label="same draft, other start_layer")
    ref = results.get("reference")
    if ref:
        ax.axhline(100 * ref["accuracy"], color="grey", ls="--",
                   label=f"full attention ({ref['correct']}/{ref['n']})")
    ax.set_xlabel("draft: first k layers of SmolLM2-135M (30 = full model), SpecPC start_layer",
                  fontsize=9)
    ax.set_ylabel("needle accuracy (%)")
    ax.set_ylim(-5, 105)
    starts = {c["draft_layers"]: c["start_layer"] for c in cfgs}
    ticks = sorted({c["draft_layers"] for c in every})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{k}\nstart {starts[k]}" if k in starts else str(k) for k in ticks],
                       fontsize=8)
    n = ref["n"] if ref else ""
    ax.set_title(f"SpecPC vs draft depth, {n} needle cases, ~{results['context_tokens']} tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--drafts", default="full,8,12,16",
                   help="draft configs: 'full' and/or layer counts k (default full,8,12,16)")
    p.add_argument("--budgets", default="1024,512", help="SpecPC prompt budgets")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--context-tokens", type=int, default=3000)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--small-start-layer", type=int, default=4,
                   help="SpecPC start_layer for drafts of <= 8 layers (default 4)")
    p.add_argument("--start-layer", type=int,
                   help="force this SpecPC start_layer for every draft (the config is then "
                        "labelled e.g. 'k=12,s=4'); default: 8, or --small-start-layer")
    p.add_argument("--base-url", help="use this running server (one --drafts entry: its draft)")
    p.add_argument("--draft-mode", choices=("auto", *DRAFT_MODES), default="auto",
                   help="k-layer drafts: num_layers = --draft.num_layers k (the product's "
                        "way); checkpoint = --draft.model <truncated copy>; auto = the first, "
                        "falling back to the second if the server does not start")
    p.add_argument("--reference-every-config", action="store_true",
                   help="measure method none on every server, not only the first")
    p.add_argument("--resume", action="store_true", help="skip configs already in --out")
    p.add_argument("--out", type=Path, default=REPO / "docs/results/specpc_draft_layers.json")
    p.add_argument("--plot", type=Path, default=REPO / "docs/results/specpc_draft_layers.png")
    args = p.parse_args(argv)

    drafts = parse_drafts(args.drafts)
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    depths = [float(d) for d in args.depths.split(",") if d.strip()]
    if args.base_url and len(drafts) != 1:
        p.error("--base-url needs exactly one --drafts entry (the draft of that server)")

    cases = build_cases(args.context_tokens, seeds, depths)
    lens = [len(c.prompt_ids) for c in cases]
    print(f"{len(cases)} needle cases, prompt tokens {min(lens)}..{max(lens)}", flush=True)

    results: dict[str, Any] = {
        "description": "SpecPC needle accuracy vs draft depth (HTTP, openai SDK, greedy)",
        "machine": machine_info(), "context_tokens": args.context_tokens,
        "prompt_tokens": {"min": min(lens), "max": max(lens)}, "seeds": seeds,
        "depths": depths, "budgets": budgets, "max_tokens": args.max_tokens,
        "commands": [" ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])],
        "reference": None, "configs": {},
    }
    if args.resume and args.out.exists():
        old = json.loads(args.out.read_text())
        results["reference"] = old.get("reference")
        results["configs"] = old.get("configs", {})
        results["commands"] = old.get("commands", [old.get("command")]) + results["commands"]

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    for layers in drafts:
        start = (args.start_layer if args.start_layer is not None
                 else start_layer_for(layers, args.small_start_layer))
        label = draft_label(layers) + (f",s={start}" if args.start_layer is not None else "")
        if label in results["configs"]:
            print(f"[{label}] already measured (--resume), skipped")
            continue
        what = "full SmolLM2" if layers is None else f"first {layers} layers"
        print(f"\n[{label}] draft = {what}, start_layer {start}", flush=True)
        srv, mode, fallback = start_draft_server(layers, args.draft_mode, args.base_url)
        try:
            client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused",
                                   timeout=1800, max_retries=0)
            cfg: dict[str, Any] = {
                "draft_layers": layers or TARGET_LAYERS, "start_layer": start,
                "forced_start_layer": args.start_layer is not None, "machine": machine_info(),
                "draft_mode": mode, "draft_mode_fallback_reason": fallback,
                "server_args": srv.extra_args, "server_startup_s": srv.startup_s,
                "load_before": load_snapshot(), SPECPC: {}}
            if results["reference"] is None or args.reference_every_config:
                ref = run_setting(client, cases, {"method": REFERENCE}, args.max_tokens,
                                  f"{label} {REFERENCE}")
                cfg["reference"] = ref
                if results["reference"] is None:
                    results["reference"] = {**ref, "measured_on": label}
            for b in budgets:
                approx = {"method": SPECPC, "prompt_budget": b, "start_layer": start}
                cfg[SPECPC][str(b)] = run_setting(client, cases, approx, args.max_tokens,
                                                    f"{label} {SPECPC} C={b}")
            cfg["load_after"] = load_snapshot()
        finally:
            srv.stop()
        results["configs"][label] = cfg
        save()
        print_table(results, budgets)

    save()
    print_table(results, budgets)
    plot(results, budgets, args.plot)
    print(f"\nwrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

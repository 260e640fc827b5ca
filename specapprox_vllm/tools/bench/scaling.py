"""How each cost grows with the prompt length: target prefill, draft, selection, scoring.

Why: issue 6 asks how the costs of the methods scale from 1k to 7k tokens (and beyond), with
a fitted slope, and for end-to-end TTFT at a realistic draft/target cost ratio. On this
machine the target and the draft are both SmolLM2-135M, so a draft costs as much as the
target. ``--large-target`` serves a dummy-weight Llama of about 8x SmolLM2's FLOPs
(``load_format: dummy``, same tokenizer; its replies are noise, its timings are real) with
SmolLM2 as the draft.

What: one server; for each length, ``--runs`` fresh needle prompts (unique tag, so prefix
caching cannot help), each served with ``max_tokens=1`` and streaming under
* ``none``: the TTFT is the target prefill (plus fixed HTTP overhead);
* ``specpc`` at ``--prompt-budget``: ``draft_ms``, ``select_ms`` and the target part;
* ``speckv`` at ``--kv-budget``: ``draft_ms``, ``score_ms`` (target scoring prefill) and
  ``select_ms`` (capture + select + compact in the workers).
Medians per length, then a least-squares fit ``log cost = a + b log L``: ``b`` is the
exponent (1 = linear, 2 = quadratic), and the cost per 1k tokens at the largest length.

Usage::

    python -m specapprox_vllm.tools.bench.scaling           # 1k..7k, SmolLM2 target
    python scripts/bench_scaling.py                          # the same, from a checkout
    python scripts/bench_scaling.py --large-target --lengths 1024,2048,4096
    python scripts/bench_scaling.py --lengths 512,1024 --runs 1 --out /tmp/s.json  # smoke

Writes ``docs/results/bench_scaling[_large].json`` and ``.png`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from specapprox_vllm.policies import NonePolicy, SpecKVPolicy, SpecPCPolicy
from specapprox_vllm.tools.bench.prefill import tagged_messages, timed_request
from specapprox_vllm.tools.eval.needle import make_needle_case
from specapprox_vllm.tools.eval.specpc_common import (
    MODEL_DIR,
    REPO,
    Server,
    draft_server_args,
    machine_info,
)

#: The methods whose costs are measured: full attention, SpecPC and SpecKV.
NONE, SPECPC, SPECKV = NonePolicy.name, SpecPCPolicy.name, SpecKVPolicy.name

# ~8x SmolLM2-135M's FLOPs per token: 24 layers, hidden 2048, MLP 5632, 16 heads (4 KV).
LARGE_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128,
                "max_position_embeddings": 16384, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                "hidden_act": "silu", "tie_word_embeddings": True, "torch_dtype": "float32"}
COSTS = (f"{NONE}_ttft", f"{SPECPC}_draft", f"{SPECPC}_target", f"{SPECPC}_select",
         f"{SPECKV}_draft", f"{SPECKV}_score", f"{SPECKV}_select")


def large_target_dir() -> Path:
    """A config-only model folder (SmolLM2's tokenizer) for ``load_format: dummy``."""
    out = REPO / "models" / "dummy-llama-8x"
    out.mkdir(parents=True, exist_ok=True)
    smol = json.loads((MODEL_DIR / "config.json").read_text())
    cfg = {**LARGE_CONFIG, "vocab_size": smol["vocab_size"],
           "bos_token_id": smol.get("bos_token_id"), "eos_token_id": smol.get("eos_token_id")}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in MODEL_DIR.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def fit(lengths: list[int], costs: list[float]) -> dict[str, float] | None:
    """Least squares of log cost on log length: exponent b, and ms per 1k at the top."""
    pts = [(math.log(n), math.log(c)) for n, c in zip(lengths, costs, strict=True) if c > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return {"exponent": round(b, 3), "ms_per_1k_at_max": round(1e3 * costs[-1] / lengths[-1], 1)}


def measure(client: Any, tok: Any, args: argparse.Namespace, length: int) -> dict[str, Any]:
    specpc = {"method": SPECPC, "prompt_budget": min(args.prompt_budget, length // 2),
              "start_layer": args.start_layer}
    speckv = {"method": SPECKV, "kv_budget": args.kv_budget, "lookahead": args.lookahead}
    rows: list[dict[str, float]] = []
    for i in range(args.runs):
        case = make_needle_case(tok, length, seed=args.seed0 + 97 * length + i, depth=0.5)
        n = timed_request(client, tagged_messages(case), {"method": NONE})
        p = timed_request(client, tagged_messages(case), specpc)
        k = timed_request(client, tagged_messages(case), speckv)
        costs = (n["ttft_ms"], p["draft_ms"], p["target_ms"], p["select_ms"], k["draft_ms"],
                 float(k["approx"].get("score_ms") or 0.0), k["select_ms"])
        rows.append({"prompt_tokens": n["prompt_tokens"],
                     **dict(zip(COSTS, costs, strict=True))})
    return {"length": length, "runs": rows,
            "median": {c: round(statistics.median(r[c] for r in rows), 1) for c in COSTS},
            "prompt_tokens": rows[0]["prompt_tokens"]}


def print_table(res: dict[str, Any]) -> None:
    head = f"{'tokens':>7}" + "".join(f"{c:>15}" for c in COSTS)
    print(f"\nmedian ms ({res['target']}; draft {res['draft']})\n{head}\n" + "-" * len(head))
    for row in res["by_length"]:
        print(f"{row['prompt_tokens']:>7}" + "".join(f"{row['median'][c]:>15.1f}"
                                                     for c in COSTS))
    print(f"{'slope':>7}" + "".join(
        f"{(res['fits'][c] or {}).get('exponent', float('nan')):>15.2f}" for c in COSTS))


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["prompt_tokens"] for r in res["by_length"]]
    for c in COSTS:
        ys = [r["median"][c] for r in res["by_length"]]
        if any(y > 0 for y in ys):
            slope = (res["fits"][c] or {}).get("exponent")
            ax.plot(xs, ys, marker="o", label=f"{c} (slope {slope})")
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="median ms",
           title=f"Cost vs prompt length: {res['target']}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import openai
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1024,2048,4096,7168")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt-budget", type=int, default=1024)
    p.add_argument("--kv-budget", type=int, default=256)
    p.add_argument("--lookahead", type=int, default=16)
    p.add_argument("--draft-layers", default="full", help="k or 'full'")
    p.add_argument("--large-target", action="store_true")
    p.add_argument("--seed0", type=int, default=7000)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    layers = None if args.draft_layers == "full" else int(args.draft_layers)
    args.start_layer = 8 if layers is None or layers > 8 else layers // 2
    lengths = [int(x) for x in args.lengths.split(",")]
    out = args.out or REPO / "docs/results" / (
        "bench_scaling_large.json" if args.large_target else "bench_scaling.json")
    server_args = draft_server_args(layers) + ["--target.max_model_len",
                                               str(max(lengths) + 1024)]
    target = "SmolLM2-135M"
    if args.large_target:
        server_args += ["--target.model", str(large_target_dir()), "--target.load_format",
                        "dummy", "--target.kv_cache_memory_gib", "2"]
        target = "dummy Llama ~8x SmolLM2 FLOPs"
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    with Server(server_args) as srv:
        client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused",
                               max_retries=0, timeout=1800)
        timed_request(client, tagged_messages(make_needle_case(tok, 512, seed=1)),
                      {"method": NONE})  # warm-up
        by_length = []
        for n in lengths:
            print(f"  {n} tokens ...", flush=True)
            by_length.append(measure(client, tok, args, n))
    xs = [r["prompt_tokens"] for r in by_length]
    res = {"command": " ".join(["python", "scripts/bench_scaling.py", *(argv or sys.argv[1:])]),
           "machine": machine_info(), "target": target, "draft": args.draft_layers,
           "by_length": by_length,
           "fits": {c: fit(xs, [r["median"][c] for r in by_length]) for c in COSTS}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print_table(res)
    plot(res, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

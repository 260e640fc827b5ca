"""Long answers decoded from a compressed KV: how closely each method's reply follows full
attention's over hundreds of tokens (issue 18's missing "long-answer accuracy").

The RULER-style suite's replies are 25-50 tokens, so with self-draft most of a SpecKV answer is
its exact lookahead and little is decoded from the compacted KV. SmolLM2-135M cannot do a task
whose reference answer is long (asked to list a 16-entry registry it scores 0 with full
attention), so this eval measures **fidelity**, the usual proxy in the KV-compression
literature: each case asks for a long reply (a detailed retelling of a document that also
states a needle), and every method's greedy reply is compared with full attention's greedy
reply to the same case, token by token (the target's tokenizer):

* ``prefix``: tokens before the first difference. A self-drafted SpecKV reply equals full
  attention's over its lookahead by construction; what follows comes from the compacted KV.
* ``lcs_f1``: ROUGE-L F1 over tokens (longest common subsequence): how much of full
  attention's reply survives after the first difference.
* ``identical``: the whole reply is full attention's.
* ``needle``: the reply states the needle's number (RULER string match), beside full
  attention's own rate: a fact that must survive the compression to be repeated late.

Usage::

    python -m specapprox_vllm.tools.eval.long_answer --samples 8 --lengths 4096 \\
        --methods speckv,snapkv,specpc --kv-budgets 256,512 --prompt-budgets 1024
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specapprox_vllm.policies import SnapKVPolicy, SpecKVPolicy, SpecPCPolicy
from specapprox_vllm.tools.eval.ruler import (
    build_haystack,
    chat_prompt,
    count_tokens,
    random_key,
    random_number,
    string_match_all,
)
from specapprox_vllm.tools.eval.specpc_common import (
    REPO,
    Server,
    add_client_args,
    machine_info,
    save_result,
)
from specapprox_vllm.tools.eval.sweep import REFERENCE, Setting, int_list, settings_from_flags

DEFAULT_METHODS = ",".join(p.name for p in (SpecKVPolicy, SnapKVPolicy, SpecPCPolicy))

__all__ = ["LongCase", "common_prefix", "lcs_f1", "make_case", "summarize", "unrelated_floor"]


@dataclass(frozen=True)
class LongCase:
    length: int
    seed: int
    messages: list[dict[str, str]]
    needle: str
    prompt_tokens: int


def make_case(tokenizer: Any, length: int, seed: int) -> LongCase:
    """A document of about ``length`` tokens (natural sentences, one needle at a random depth)
    and a request for a detailed retelling that mentions the needle."""
    rng = random.Random(f"long_answer:{length}:{seed}")
    key, value = random_key(rng, set()), random_number(rng, set())
    needle = f"The special magic number for {key} is: {value}."
    q = (f"Retell the text above in detail, sentence by sentence, in order. Include the special "
         f"magic number for {key}.")
    overhead = count_tokens(tokenizer, needle + q) + 40
    doc = build_haystack(rng, tokenizer, max(length - overhead, 16), [needle])
    messages, n = chat_prompt(
        tokenizer, f"Read the text and answer the question.\n\n{doc}\n\nQuestion: {q}")
    return LongCase(length, seed, messages, value, n)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def lcs_f1(pred: list[int], ref: list[int]) -> float:
    """ROUGE-L F1 over token sequences: ``2 P R / (P + R)`` with ``P = LCS / len(pred)``,
    ``R = LCS / len(ref)``; 1.0 for two empty replies."""
    if not pred or not ref:
        return float(pred == ref)
    prev = [0] * (len(ref) + 1)
    for x in pred:  # O(len(pred) * len(ref)) with two rows: ~400 x 400 here
        cur = [0]
        for j, y in enumerate(ref):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


def compare(ids: list[int], ref_ids: list[int]) -> dict[str, Any]:
    return {"prefix": common_prefix(ids, ref_ids), "lcs_f1": round(lcs_f1(ids, ref_ids), 4),
            "identical": ids == ref_ids}


def unrelated_floor(replies: list[list[int]]) -> float | None:
    """Mean ROUGE-L F1 between full attention's replies to *different* cases: what two
    unrelated retellings share (the same style, the same stock phrases). A method's F1 is
    read against it, not against 0."""
    pairs = [lcs_f1(a, b) for i, a in enumerate(replies) for j, b in enumerate(replies)
             if i != j]
    return round(statistics.fmean(pairs), 3) if pairs else None


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per setting: means of prefix, lcs_f1, identical, needle, reply tokens, and the share of
    requests the method compressed. Records without a reference reply are left out."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if "error" not in r and r.get("lcs_f1") is not None:
            by[r["setting"]].append(r)
    out = {}
    for label, rs in by.items():
        out[label] = {
            "n": len(rs),
            "prefix": round(statistics.fmean(r["prefix"] for r in rs), 1),
            "lcs_f1": round(statistics.fmean(r["lcs_f1"] for r in rs), 3),
            "identical": round(statistics.fmean(r["identical"] for r in rs), 3),
            "needle": round(statistics.fmean(r["needle"] for r in rs), 3),
            "reply_tokens": round(statistics.fmean(r["reply_tokens"] for r in rs), 1),
            "compressed": round(statistics.fmean(bool((r.get("approx") or {}).get("applied"))
                                                 for r in rs), 3),
        }
    return out


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    lines = ["| setting | n | reply tokens | first difference at (tokens) | ROUGE-L F1 vs full "
             "| identical | needle stated | compressed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, s in summary.items():
        lines.append(f"| {label} | {s['n']} | {s['reply_tokens']} | {s['prefix']} | "
                     f"{s['lcs_f1']:.3f} | {s['identical']:.2f} | {s['needle']:.2f} | "
                     f"{s['compressed']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(labels)), 3.6))
    ax.bar(labels, [summary[k]["lcs_f1"] for k in labels], color="tab:blue",
           label="ROUGE-L F1 vs full attention")
    ax.plot(labels, [summary[k]["needle"] for k in labels], "o", color="tab:red",
            label="needle stated")
    ax.set_ylim(0, 1.05)
    ax.set_title("Long replies: fidelity to full attention's reply", fontsize=10)
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


async def run(args: argparse.Namespace, base_url: str) -> list[dict[str, Any]]:
    import openai
    from tqdm import tqdm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    grid = settings_from_flags(args)
    cases = [make_case(tok, n, args.seed0 + i) for i in range(args.samples)
             for n in int_list(args.lengths)]
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=args.api_key or "unused",
                                max_retries=0, timeout=args.timeout)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(cases) * len(grid), unit="req", file=sys.stdout)

    async def serve(case: LongCase, s: Setting) -> dict[str, Any]:
        rec: dict[str, Any] = {"setting": s.label, "method": s.method, "length": case.length,
                               "seed": case.seed, "prompt_tokens": case.prompt_tokens}
        t0 = time.perf_counter()
        try:
            resp = await client.chat.completions.create(
                model=args.model, messages=case.messages, max_tokens=args.max_tokens,
                temperature=0.0, extra_body={"approx": s.approx(args.cascade_prompt_budget)})
            text = resp.choices[0].message.content or ""
            rec.update(text=text, ids=tok.encode(text, add_special_tokens=False),
                       needle=string_match_all(text, (case.needle,)),
                       approx=(resp.usage.model_extra or {}).get("approx"))
        except Exception as exc:  # noqa: BLE001 - recorded and left out of the means
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        bar.update(1)
        return rec

    assert grid[0].method == REFERENCE  # served first: every other reply is compared with it
    for case in cases:
        ref = await serve(case, grid[0])
        group = [ref] + [await serve(case, s) for s in grid[1:]]
        for rec in group:
            if "error" in rec or "error" in ref:
                rec["lcs_f1"] = None
                continue
            rec.update(compare(rec["ids"], ref["ids"]), reply_tokens=len(rec["ids"]))
        records += group
    bar.close()
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_client_args(p)
    p.add_argument("--lengths", default="4096")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated; full attention is always served first")
    p.add_argument("--kv-budgets", default="256,512")
    p.add_argument("--prompt-budgets", default="1024")
    p.add_argument("--cascade-prompt-budget", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=REPO / "docs/results/long_answer.json")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with Server(["--target.max_model_len", "8192"], base_url=args.base_url) as srv:
        records = asyncio.run(run(args, srv.base_url))
    errors = [r for r in records if "error" in r]
    summary = summarize(records)
    floor = unrelated_floor([r["ids"] for r in records
                             if r["setting"] == REFERENCE and "error" not in r])
    result = {"command": " ".join(sys.argv), "machine": machine_info(),
              "args": vars(args) | {"out": str(args.out)}, "wall_s": round(time.time() - t0, 1),
              "summary": summary, "unrelated_floor": floor,
              "records": [{k: v for k, v in r.items() if k != "ids"} for r in records]}
    table = markdown_table(summary) + (
        f"\nROUGE-L F1 between full attention's replies to different cases (the floor): "
        f"{floor}\n")
    print(table)
    save_result(args.out, result, table, errors)
    plot(summary, args.out)
    print(f"wrote {args.out}, its table and plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

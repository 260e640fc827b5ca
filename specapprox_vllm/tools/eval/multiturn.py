"""Multi-turn (SCBench-style) accuracy and latency of every method, over HTTP.

Why: chat over one long document is how long contexts are used. SCBench (Li et al., 2024)
found that compressing once for one query can lose what a later query needs, and a later
turn's prompt is the whole conversation again, so its cost depends on the prefix cache
(``usage.prompt_tokens_details.cached_tokens``). Per case: one haystack document with several
key -> number needles (RULER's wording), a different key asked at each turn, each setting's
conversation carrying its own replies; every turn is scored (RULER string match) and timed.
Each conversation has its own ``cache_salt``: turn 1 is cold, later turns hit only their own
blocks. ``--resume`` serves again incomplete, failed or fallen-back conversations.

Usage::

    python -m specapprox_vllm.tools.eval.multiturn                # starts its own server
    python scripts/eval_multiturn.py --base-url http://127.0.0.1:8000  # or uses yours
    python scripts/eval_multiturn.py --resume       # continue a stopped sweep
    python scripts/eval_multiturn.py --report-only  # table and plot from the records so far
    python scripts/eval_multiturn.py --methods speckv --kv-budgets 128 --samples 2 \\
        --out /tmp/mt.json                                             # smoke

Writes ``docs/results/multiturn.json`` (``--out``), the table as ``multiturn.md`` and the
plot as ``multiturn.png`` beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from specapprox_vllm.policies import (
    SnapKVPolicy,
    SpecKVPCPolicy,
    SpecKVPolicy,
    SpecPCPolicy,
    get_policy,
    method_names,
)
from specapprox_vllm.tools.eval.ruler import (
    build_haystack,
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

DEFAULT_METHODS = ",".join(p.name for p in (SpecKVPolicy, SnapKVPolicy, SpecPCPolicy,
                                            SpecKVPCPolicy))
#: Needles per document: more than the turns, so every question has distractors.
NEEDLES = 3  # SmolLM2-135M retrieves 3 keys from 4k tokens; at 6 full attention scored 0.25
INSTRUCTION = "Read the text and answer the questions."
#: Fields of ``usage.approx`` summarized as medians per turn.
COST_FIELDS = ("draft_ms", "score_ms", "select_ms")
ORDER_NOTE = ("within a case the settings ran one after another, in the order of the records' "
              "'order' (0 first): only order 0 met the document with a cold prefix cache "
              "(unless an earlier run or another client had served it)")


def question(key: str) -> str:
    """RULER's single-needle question (the same wording at every turn)."""
    return (f"What is the special magic number for {key} mentioned in the provided text? "
            "Answer with the number only.")


@dataclass(frozen=True)
class MultiTurnCase:
    """One document and the questions of its turns; the replies are each setting's own."""

    length: int  # the requested size of turn 1's prompt, in tokens
    seed: int
    needles: tuple[tuple[str, str], ...]  # (key, number), in document order
    asked: tuple[int, ...]  # the needle asked at each turn (distinct)
    document: str
    doc_tokens: int
    prompt_tokens: int  # turn 1's prompt with the chat template (0 without a tokenizer)

    @property
    def turns(self) -> int:
        return len(self.asked)

    def key(self, turn: int) -> str:  # turns count from 1
        return self.needles[self.asked[turn - 1]][0]

    def answer(self, turn: int) -> str:
        return self.needles[self.asked[turn - 1]][1]

    def user_content(self, turn: int) -> str:
        """Turn 1 carries the document (RULER's layout); later turns only their question."""
        if turn == 1:
            return f"{INSTRUCTION}\n\n{self.document}\n\nQuestion: {question(self.key(1))}"
        return question(self.key(turn))

    def messages(self, turn: int, replies: list[str]) -> list[dict[str, str]]:
        """Earlier questions with their replies (``replies[i]`` answers turn i + 1), then
        this turn's question."""
        if len(replies) < turn - 1:
            raise ValueError(f"turn {turn} needs {turn - 1} earlier replies, got {len(replies)}")
        out: list[dict[str, str]] = []
        for t in range(1, turn):
            out += [{"role": "user", "content": self.user_content(t)},
                    {"role": "assistant", "content": replies[t - 1]}]
        return out + [{"role": "user", "content": self.user_content(turn)}]

    def score(self, turn: int, text: str) -> float:
        return string_match_all(text, (self.answer(turn),))


def chat_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """Tokens of ``messages`` in the chat template, with the generation prompt."""
    if tokenizer is None:
        return 0
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return len(ids)


def make_case(tokenizer: Any, length: int, seed: int, turns: int = 3,
              needles: int = NEEDLES) -> MultiTurnCase:
    """A deterministic case, turn-1 prompt about ``length`` tokens. Needle ``i`` lies at a
    random depth in the ``i``-th of ``needles`` parts; turns ask distinct needles in random
    order."""
    if not 1 <= turns <= needles:
        raise ValueError(f"turns must be in 1..{needles} (the needles), got {turns}")
    rng = random.Random(f"multiturn:{length}:{seed}:{needles}")
    keys: set[str] = set()
    values: set[str] = set()
    facts = [(random_key(rng, keys), random_number(rng, values)) for _ in range(needles)]
    order = list(range(needles))
    rng.shuffle(order)
    inserts = [f"One of the special magic numbers for {k} is: {v}." for k, v in facts]
    overhead = count_tokens(tokenizer, " ".join(inserts) + INSTRUCTION + question(facts[0][0])
                            ) + 40
    # each part overshoots its share by half a sentence on average (about 10 tokens)
    part = max((length - overhead) // needles - 10, 16)
    document = " ".join(build_haystack(rng, tokenizer, part, [text]) for text in inserts)
    case = MultiTurnCase(length, seed, tuple(facts), tuple(order[:turns]), document,
                         count_tokens(tokenizer, document), 0)
    return replace(case, prompt_tokens=chat_tokens(tokenizer, case.messages(1, [])))


def _get(obj: Any, key: str) -> Any:
    """``obj[key]`` for a dict, else the attribute, else the pydantic extra field (the openai
    SDK keeps fields it does not declare, such as ``usage.approx``, in ``model_extra``)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    val = getattr(obj, key, None)
    if val is None:
        val = (getattr(obj, "model_extra", None) or {}).get(key)
    return val


def usage_fields(usage: Any) -> tuple[int | None, int | None, dict[str, Any]]:
    """(prompt_tokens, cached_tokens, usage.approx) of a final usage chunk, dict or object;
    None where the server did not say (``cached_tokens`` needs prompt_tokens_details)."""
    prompt = _get(usage, "prompt_tokens")
    cached = _get(_get(usage, "prompt_tokens_details"), "cached_tokens")
    approx = _get(usage, "approx") or {}
    if not isinstance(approx, dict):
        approx = approx.model_dump() if hasattr(approx, "model_dump") else dict(vars(approx))
    return (None if prompt is None else int(prompt), None if cached is None else int(cached),
            approx)


async def stream_turn(client: Any, model: str, messages: list[dict[str, str]],
                      max_tokens: int, approx: dict[str, Any], salt: str = "") -> dict:
    """One streamed request: its text, client-side TTFT (first chunk with content; the first
    chunk at all when no content came) and latency, and the final chunk's usage."""
    t0 = time.perf_counter()
    first = ttft = None
    parts: list[str] = []
    usage = None
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"approx": approx, **({"cache_salt": salt} if salt else {})})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:
            first = now if first is None else first
            content = getattr(chunk.choices[0].delta, "content", None)
            if content:
                parts.append(content)
                ttft = now if ttft is None else ttft
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage
    end = time.perf_counter()
    prompt, cached, a = usage_fields(usage)
    ttft = ttft if ttft is not None else (first if first is not None else end)
    return {"text": "".join(parts), "ttft_s": round(ttft - t0, 4),
            "latency_s": round(end - t0, 4), "prompt_tokens": prompt, "cached_tokens": cached,
            "approx": a}


def usable(r: dict[str, Any]) -> bool:
    """Served without error, and not a draft-failure fallback (that measured ``none``)."""
    return ("error" not in r and r.get("score") is not None
            and not (r.get("approx") or {}).get("fallback"))


def conversation_key(r: dict[str, Any]) -> tuple[str, int, int]:
    return (r["setting"], r["length"], r["seed"])


def load_records(path: Path) -> list[dict[str, Any]]:
    """Each conversation's latest attempt (later turns carry the earlier replies)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last = {conversation_key(r): r.get("attempt") for r in lines}
    return [r for r in lines if r.get("attempt") == last[conversation_key(r)]]


def _drafts_lookahead(method: str) -> bool:
    """SpecKV-like (draft lookahead + KV): with self-draft an answer within the lookahead is
    full attention, so short answers need a lookahead below ``--max-tokens``."""
    policy = get_policy(method)
    return policy.needs_draft and policy.compresses_kv


async def serve_conversation(client: Any, args: argparse.Namespace, case: MultiTurnCase,
                             setting: Setting, order: int, sink: Callable[[dict], None],
                             bar: Any) -> None:
    """All turns of one setting on one case, in order; stops at a failed turn (the next one
    would need its reply)."""
    approx = setting.approx(args.cascade_prompt_budget)
    if getattr(args, "lookahead", None) is not None and _drafts_lookahead(setting.method):
        approx["lookahead"] = args.lookahead
    attempt = uuid.uuid4().hex[:12]
    replies: list[str] = []
    for turn in range(1, case.turns + 1):
        rec: dict[str, Any] = {"setting": setting.label, "method": setting.method,
                               "budget": setting.budget, "length": case.length,
                               "seed": case.seed, "turn": turn, "order": order,
                               "attempt": attempt, "answer": case.answer(turn)}
        try:
            out = await stream_turn(client, args.model, case.messages(turn, replies),
                                    args.max_tokens, approx, salt=f"multiturn-{attempt}")
        except Exception as exc:  # noqa: BLE001 - recorded, kept out of the means
            rec.update(score=None, error=f"{type(exc).__name__}: {exc}"[:300])
            sink(rec)
            bar.update(case.turns - turn + 1)
            return
        replies.append(out["text"])
        rec.update(out, score=case.score(turn, out["text"]), text=out["text"][:200])
        sink(rec)
        bar.update(1)


async def run(args: argparse.Namespace, base_url: str, out: Path) -> list[dict[str, Any]]:
    """Serve every setting on every case not already done; the records of the latest
    attempts."""
    import openai
    from tqdm import tqdm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    grid = settings_from_flags(args)
    jsonl = out.with_suffix(".records.jsonl")
    latest: dict[tuple[str, int, int, int], dict[str, Any]] = {}
    if args.resume and jsonl.exists():
        latest = {(*conversation_key(r), r["turn"]): r for r in load_records(jsonl)}
    elif jsonl.exists():
        jsonl.unlink()
    done = {c for c in {k[:3] for k in latest} if all(
        usable(latest.get((*c, t), {"error": "missing"})) for t in range(1, args.turns + 1))}
    jobs = []
    for i in range(args.samples):  # sample-major: a stopped sweep covers every length evenly
        for length in int_list(args.lengths):
            todo = [s for s in grid if (s.label, length, args.seed0 + i) not in done]
            if todo:
                jobs.append((make_case(tok, length, args.seed0 + i, args.turns), todo))
    total = sum(len(t) for _, t in jobs) * args.turns
    print(f"{len(grid)} settings, {len(jobs)} cases to serve, {total} requests", flush=True)
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=args.api_key or "unused",
                                max_retries=0, timeout=args.timeout)
    gate = asyncio.Semaphore(args.concurrency)
    with jsonl.open("a") as fh, tqdm(total=total, unit="req", file=sys.stdout) as bar:
        def sink(rec: dict[str, Any]) -> None:
            if rec["turn"] == 1:  # a new attempt replaces the conversation's old turns
                for t in range(1, args.turns + 1):
                    latest.pop((*conversation_key(rec), t), None)
            latest[(*conversation_key(rec), rec["turn"])] = rec
            fh.write(json.dumps(rec) + "\n")
            fh.flush()

        async def one(case: MultiTurnCase, todo: list[Setting]) -> None:
            async with gate:
                for order, setting in enumerate(todo):
                    await serve_conversation(client, args, case, setting, order, sink, bar)

        await asyncio.gather(*[one(c, t) for c, t in jobs])
    return list(latest.values())


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def turn_stats(recs: list[dict[str, Any]], first: dict[Any, float]) -> dict[str, Any]:
    """Means and medians of one setting's usable records at one turn; ``first`` maps each
    conversation to its turn-1 latency (for the per-conversation latency ratio)."""
    def conv(r: dict[str, Any]) -> Any:
        return (*conversation_key(r), r.get("attempt"))

    approx = [r.get("approx") or {} for r in recs]
    return {
        "n": len(recs),
        "accuracy": statistics.fmean(r["score"] for r in recs),
        "ttft_s": _median([r.get("ttft_s") for r in recs]),
        "latency_s": _median([r.get("latency_s") for r in recs]),
        "latency_vs_turn1": _median([r["latency_s"] / first[conv(r)] for r in recs
                                     if first.get(conv(r)) and r.get("latency_s") is not None]),
        "prompt_tokens": _median([r.get("prompt_tokens") for r in recs]),
        "cached_frac": _median([r["cached_tokens"] / r["prompt_tokens"] for r in recs
                                if r.get("cached_tokens") is not None and r.get("prompt_tokens")]),
        **{k: _median([a.get(k) for a in approx]) for k in COST_FIELDS},
        "applied": statistics.fmean(bool(a.get("applied")) for a in approx),
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per (setting, length), in the order the settings first appear, with the stats
    of each turn (:func:`turn_stats`) and ``mean``, the mean of the turns' accuracies. Records
    that are not :func:`usable` are left out; a latency ratio needs both turns of the same
    conversation to be usable."""
    ok = [r for r in records if usable(r)]
    first = {(*conversation_key(r), r.get("attempt")): r["latency_s"] for r in ok
             if r["turn"] == 1 and r.get("latency_s")}
    labels = list(dict.fromkeys(r["setting"] for r in ok))
    lengths = sorted({r["length"] for r in ok})
    turns = sorted({r["turn"] for r in ok})
    rows = []
    for length in lengths:
        for label in labels:
            group = [r for r in ok if r["setting"] == label and r["length"] == length]
            if not group:
                continue
            by_turn = {str(t): turn_stats([r for r in group if r["turn"] == t], first)
                       for t in turns if any(r["turn"] == t for r in group)}
            rows.append({"setting": label, "method": group[0]["method"],
                         "budget": group[0]["budget"], "length": length,
                         "conversations": len({conversation_key(r) for r in group}),
                         "mean": statistics.fmean(s["accuracy"] for s in by_turn.values()),
                         "turns": by_turn})
    return {"lengths": lengths, "turns": turns, "rows": rows,
            "not_counted": len(records) - len(ok)}


TABLE_HEAD = ("setting", "length", "turn", "n", "accuracy", "TTFT s", "latency s",
              "vs turn 1", "cached", *(f"{k[:-3]} ms" for k in COST_FIELDS))


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The table's cells: one line per (setting, length, turn)."""
    def f(v: float | None, spec: str) -> str:
        return "–" if v is None else format(v, spec)

    lines = []
    for row in summary["rows"]:
        name = f"{row['setting']} (full)" if row["setting"] == REFERENCE else row["setting"]
        for t, s in row["turns"].items():
            lines.append([name, str(row["length"]), t, str(s["n"]), f(s["accuracy"], ".2f"),
                          f(s["ttft_s"], ".3f"), f(s["latency_s"], ".3f"),
                          f(s["latency_vs_turn1"], ".2f"), f(s["cached_frac"], ".2f"),
                          *(f(s[k], ".1f") for k in COST_FIELDS)])
    return lines


def markdown_table(summary: dict[str, Any]) -> str:
    """``multiturn.md``: medians except accuracy (a mean); ``vs turn 1``: median over
    conversations of latency(t) / latency(1); ``cached``: share of the prompt cache-served."""
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|---" + "|---:" * (len(TABLE_HEAD) - 1) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(summary)]
    lines.append("\nAccuracy: RULER string match, mean; times: client-side medians; cached: "
                 "usage.prompt_tokens_details.cached_tokens / prompt_tokens.")
    if summary["not_counted"]:
        lines.append(f"\n{summary['not_counted']} records not counted (failed or fell back).")
    return "\n".join(lines) + "\n"


def print_table(summary: dict[str, Any]) -> None:
    rows = [list(TABLE_HEAD), *table_rows(summary)]
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(len(TABLE_HEAD))]
    text = ["".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                    enumerate(zip(r, widths, strict=True))) for r in rows]
    print("\n" + text[0] + "\n" + "-" * len(text[0]) + "\n" + "\n".join(text[1:]))


def plot(summary: dict[str, Any], path: Path) -> None:
    """Two panels over the turns: accuracy, and latency relative to turn 1, per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    several = len(summary["lengths"]) > 1
    for row in summary["rows"]:
        label = row["setting"] + (f" ({row['length']} tok)" if several else "")
        style = {"color": "black", "ls": "--", "zorder": 3} if row["setting"] == REFERENCE else {}
        for ax, key in ((axes[0], "accuracy"), (axes[1], "latency_vs_turn1")):
            pts = [(int(t), s[key]) for t, s in row["turns"].items() if s[key] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label, **style)
    axes[0].set(xlabel="turn", ylabel="accuracy (RULER string match)", ylim=(0, 1.05))
    axes[1].set(xlabel="turn", ylabel="latency / turn-1 latency (median)")
    for ax in axes:
        ax.set_xticks(summary["turns"])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Multi-turn accuracy and latency (one document, a new question per turn)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_client_args(p)
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, of {','.join(method_names())} (default "
                        f"{DEFAULT_METHODS}; full attention is always served first)")
    p.add_argument("--kv-budgets", default="128,256")
    p.add_argument("--prompt-budgets", default="512,1024")
    p.add_argument("--cascade-prompt-budget", type=int, default=2048,
                   help="prompt_budget of methods that also sweep kv_budget (speckv_pc)")
    p.add_argument("--lengths", default="4096", help="turn-1 prompt tokens, comma-separated")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--turns", type=int, default=3, help=f"questions per case (1..{NEEDLES})")
    p.add_argument("--lookahead", type=int, default=8,
                   help="lookahead of SpecKV and the cascade (-1: the method's default)")
    p.add_argument("--max-tokens", type=int, default=32,
                   help="per turn; a reply restating the question needs about 21")
    p.add_argument("--concurrency", type=int, default=1,
                   help="cases served at once (1: latencies not mixed with other requests)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--resume", action="store_true", help="skip conversations already served")
    p.add_argument("--report-only", action="store_true",
                   help="no server: summarize the records already in <out>.records.jsonl")
    p.add_argument("--out", type=Path, default=REPO / "docs/results/multiturn.json")
    args = p.parse_args(argv)
    args.lookahead = None if args.lookahead < 0 else args.lookahead
    if not 1 <= args.turns <= NEEDLES:
        p.error(f"--turns must be in 1..{NEEDLES}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.report_only:
        records = load_records(args.out.with_suffix(".records.jsonl"))
    else:
        with Server(["--target.max_model_len", "8192"], base_url=args.base_url) as srv:
            records = asyncio.run(run(args, srv.base_url, args.out))
    summary = summarize(records)
    errors = [r for r in records if not usable(r)]
    result = {"command": " ".join(sys.argv), "machine": machine_info(),
              "args": vars(args) | {"out": str(args.out)}, "wall_s": round(time.time() - t0, 1),
              "requests": len(records), "errors": len(errors), "order_note": ORDER_NOTE,
              "summary": summary}
    print_table(summary)
    save_result(args.out, result, markdown_table(summary), errors)
    plot(summary, args.out.with_suffix(".png"))
    print(f"wrote {args.out}, {args.out.with_suffix('.md').name} and "
          f"{args.out.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

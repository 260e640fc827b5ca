"""The multi-turn evaluation's case builder, usage parsing and summary, against hand-checked
expectations (needles found in the text, conversations rebuilt by hand, medians and ratios
computed by hand). No engine and no server: the HTTP side is not exercised here."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from specapprox_vllm.tools.eval.multiturn import (
    NEEDLES,
    load_records,
    make_case,
    markdown_table,
    question,
    summarize,
    usable,
    usage_fields,
)
from specapprox_vllm.tools.eval.ruler import _haystack, _key, build_haystack, random_key


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_ruler_public_helpers_are_the_old_ones() -> None:
    assert build_haystack is _haystack and random_key is _key


@pytest.mark.parametrize("length", [1024, 4096])
def test_cases_are_deterministic_and_sized(tok, length: int) -> None:
    case = make_case(tok, length, seed=3)
    assert case == make_case(tok, length, seed=3)
    assert case != make_case(tok, length, seed=4)
    assert abs(case.prompt_tokens - length) <= 0.1 * length, case.prompt_tokens
    assert case.doc_tokens == len(tok.encode(case.document, add_special_tokens=False))
    assert length - 150 <= case.doc_tokens < case.prompt_tokens <= length + 0.1 * length
    # fewer turns: the same document, a prefix of the same questions
    short = make_case(tok, length, seed=3, turns=2)
    assert short.document == case.document and short.asked == case.asked[:2]


def test_questions_ask_distinct_keys_whose_needles_are_spread_in_the_document(tok) -> None:
    case = make_case(tok, 4096, seed=0)
    assert case.turns == 3 and len(case.needles) == NEEDLES
    keys = [case.key(t) for t in (1, 2, 3)]
    assert len(set(keys)) == 3
    found = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", case.document)
    assert found == list(case.needles)  # every needle once, in document order
    assert len({k for k, _ in found}) == NEEDLES and len({v for _, v in found}) == NEEDLES
    for t in (1, 2, 3):
        assert f"for {case.key(t)} is: {case.answer(t)}." in case.document
    # needle i lies in the i-th sixth of the document (with a sentence of slack)
    for i, (k, _) in enumerate(case.needles):
        depth = case.document.index(f"for {k} is:") / len(case.document)
        assert i / NEEDLES - 0.03 <= depth <= (i + 1) / NEEDLES + 0.03, (i, depth)


def test_messages_carry_the_earlier_replies_in_order(tok) -> None:
    case = make_case(tok, 1024, seed=1)
    m1 = case.messages(1, [])
    assert len(m1) == 1 and m1[0]["role"] == "user"
    assert case.document in m1[0]["content"]
    assert m1[0]["content"].endswith("Question: " + question(case.key(1)))
    m3 = case.messages(3, ["first reply", "second reply"])
    assert [m["role"] for m in m3] == ["user", "assistant", "user", "assistant", "user"]
    assert m3[0] == m1[0]
    assert [m3[1]["content"], m3[3]["content"]] == ["first reply", "second reply"]
    assert m3[2]["content"] == question(case.key(2))
    assert m3[4]["content"] == question(case.key(3))
    assert case.document not in m3[2]["content"] + m3[4]["content"]
    assert case.messages(2, ["first reply", "ignored"]) == m3[:3]
    with pytest.raises(ValueError):
        case.messages(3, ["only one"])
    with pytest.raises(ValueError):
        make_case(tok, 1024, seed=1, turns=NEEDLES + 1)


def test_score_is_string_match_against_that_turns_number(tok) -> None:
    case = make_case(tok, 1024, seed=2)
    assert case.score(2, f"The number is {case.answer(2)}.") == 1.0
    assert case.score(2, f"The number is {case.answer(1)}.") == 0.0


def test_usage_fields_from_dicts_and_sdk_objects() -> None:
    from openai.types import CompletionUsage

    approx = {"method": "speckv", "applied": True, "draft_ms": 5.0}
    obj = CompletionUsage.model_validate({
        "prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103,
        "prompt_tokens_details": {"cached_tokens": 64}, "approx": approx})
    assert usage_fields(obj) == (100, 64, approx)
    assert usage_fields({"prompt_tokens": 7, "approx": approx}) == (7, None, approx)
    assert usage_fields({"prompt_tokens": 7, "prompt_tokens_details": None}) == (7, None, {})
    bare = CompletionUsage(prompt_tokens=5, completion_tokens=1, total_tokens=6)
    assert usage_fields(bare) == (5, None, {})
    assert usage_fields(None) == (None, None, {})


def rec(setting: str, seed: int, turn: int, score: float | None, latency: float,
        cached: int | None = None, prompt: int = 100, **extra: object) -> dict:
    return {"setting": setting, "method": setting.split("@")[0],
            "budget": int(setting.split("@")[1]) if "@" in setting else None,
            "length": 4096, "seed": seed, "turn": turn, "score": score, "ttft_s": latency / 2,
            "latency_s": latency, "prompt_tokens": prompt, "cached_tokens": cached,
            "approx": {"applied": "@" in setting, "draft_ms": 10.0 * turn}, **extra}


def test_summary_means_ratios_and_cached_share_by_hand() -> None:
    records = [
        # full attention, two conversations
        rec("none", 0, 1, 1.0, 2.0, cached=0), rec("none", 0, 2, 1.0, 1.0, cached=90),
        rec("none", 1, 1, 1.0, 4.0, cached=50), rec("none", 1, 2, 0.0, 1.0, cached=80),
        # speckv: seed 0 fine; seed 1's turn 2 failed, seed 2's turn 1 fell back
        rec("speckv@128", 0, 1, 1.0, 2.0), rec("speckv@128", 0, 2, 0.0, 3.0),
        rec("speckv@128", 1, 1, 0.0, 1.0), rec("speckv@128", 1, 2, None, 0.1, error="boom"),
        rec("speckv@128", 2, 1, 1.0, 9.0), rec("speckv@128", 2, 2, 1.0, 9.0),
    ]
    records[8]["approx"]["fallback"] = "draft failed"
    assert [usable(r) for r in records].count(False) == 2
    s = summarize(records)
    assert s["lengths"] == [4096] and s["turns"] == [1, 2] and s["not_counted"] == 2
    none, spec = s["rows"]
    assert (none["setting"], none["budget"], spec["setting"], spec["budget"]) == (
        "none", None, "speckv@128", 128)
    assert none["conversations"] == 2 and spec["conversations"] == 3
    t1, t2 = none["turns"]["1"], none["turns"]["2"]
    assert (t1["n"], t1["accuracy"], t2["accuracy"]) == (2, 1.0, 0.5)
    assert none["mean"] == pytest.approx(0.75)
    assert t1["latency_s"] == pytest.approx(3.0) and t1["ttft_s"] == pytest.approx(1.5)
    assert t1["latency_vs_turn1"] == pytest.approx(1.0)
    assert t2["latency_vs_turn1"] == pytest.approx((0.5 + 0.25) / 2)  # median of 1/2, 1/4
    assert t1["cached_frac"] == pytest.approx(0.25) and t2["cached_frac"] == pytest.approx(0.85)
    assert t2["draft_ms"] == pytest.approx(20.0) and t1["applied"] == 0.0
    # speckv: the error and the fallback are out; seed 2's turn 2 has no usable turn 1
    s1, s2 = spec["turns"]["1"], spec["turns"]["2"]
    assert (s1["n"], s1["accuracy"]) == (2, 0.5)
    assert (s2["n"], s2["accuracy"]) == (2, 0.5)  # seed 0 (0.0) and seed 2 (1.0)
    assert s2["latency_vs_turn1"] == pytest.approx(1.5)  # seed 0 only: 3.0 / 2.0
    assert s2["latency_s"] == pytest.approx(6.0)  # median of 3.0 and 9.0
    assert s1["cached_frac"] is None  # the server did not report cached tokens
    assert s1["applied"] == 1.0
    md = markdown_table(s)
    assert md.splitlines()[0].startswith("| setting | length | turn | n | accuracy |")
    assert "| none (full) | 4096 | 2 | 2 | 0.50 | 0.500 | 1.000 | 0.38 | 0.85 |" in md
    assert "2 records not counted" in md


def test_load_records_keeps_each_conversations_latest_attempt(tmp_path: Path) -> None:
    old = [rec("none", 0, 1, 1.0, 1.0, attempt="a"), rec("none", 0, 2, 1.0, 1.0, attempt="a"),
           rec("none", 0, 3, 1.0, 1.0, attempt="a"),
           rec("none", 1, 1, 1.0, 1.0, attempt="b"), rec("none", 1, 2, None, 1.0,
                                                         attempt="b", error="x")]
    new = [rec("none", 0, 1, 0.0, 2.0, attempt="c"), rec("none", 0, 2, 0.0, 2.0, attempt="c",
                                                         error="y")]
    path = tmp_path / "r.records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in old + new))
    got = load_records(path)
    assert [(r["seed"], r["turn"], r["attempt"]) for r in got] == [
        (1, 1, "b"), (1, 2, "b"), (0, 1, "c"), (0, 2, "c")]  # seed 0's old turn 3 is gone


class FakeCompletions:
    """Streams a canned reply per request and remembers what it was sent (no server)."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.sent: list[dict] = []
        self.fail_on = fail_on

    async def create(self, **kw: object) -> object:
        from openai.types.chat import ChatCompletionChunk

        self.sent.append(kw)
        n = len(self.sent)
        if n == self.fail_on:
            raise RuntimeError("server gone")
        base = {"id": "x", "created": 0, "model": "m", "object": "chat.completion.chunk"}
        chunks = [ChatCompletionChunk.model_validate(base | {"choices": [
            {"index": 0, "delta": {"role": "assistant", "content": c}}]}) for c in
            ("", f"reply {n}")]
        chunks.append(ChatCompletionChunk.model_validate(base | {"choices": [], "usage": {
            "prompt_tokens": 100 * n, "completion_tokens": 2, "total_tokens": 100 * n + 2,
            "prompt_tokens_details": {"cached_tokens": 10 * n},
            "approx": {"method": "speckv", "applied": True, "draft_ms": 1.5}}}))

        async def gen() -> AsyncIterator[object]:
            for c in chunks:
                yield c
        return gen()


@pytest.mark.parametrize("fail_on", [None, 2])
async def test_serve_conversation_streams_turns_with_own_replies(tok, fail_on) -> None:
    import argparse
    from types import SimpleNamespace

    from specapprox_vllm.tools.eval.multiturn import serve_conversation
    from specapprox_vllm.tools.eval.sweep import Setting

    case = make_case(tok, 1024, seed=5)
    fake = FakeCompletions(fail_on)
    client = SimpleNamespace(chat=SimpleNamespace(completions=fake))
    args = argparse.Namespace(model="m", max_tokens=32, cascade_prompt_budget=2048)
    recs: list[dict] = []
    bar = SimpleNamespace(n=0)
    bar.update = lambda k: setattr(bar, "n", bar.n + k)
    await serve_conversation(client, args, case, Setting("speckv", 128), 1, recs.append, bar)
    assert bar.n == 3  # the turns a failure skips are counted as done
    body = fake.sent[0]["extra_body"]
    assert body["approx"] == {"method": "speckv", "kv_budget": 128}
    # one cache_salt per conversation, the same on every turn: turn 1 starts cold
    assert {s["extra_body"]["cache_salt"] for s in fake.sent} == {body["cache_salt"]}
    assert body["cache_salt"].startswith("multiturn-")
    assert fake.sent[0]["stream"] is True and fake.sent[0]["temperature"] == 0.0
    if fail_on is None:
        assert [m["content"] for m in fake.sent[2]["messages"][1::2]] == ["reply 1", "reply 2"]
        assert [r["turn"] for r in recs] == [1, 2, 3]
        r = recs[1]
        assert (r["text"], r["prompt_tokens"], r["cached_tokens"]) == ("reply 2", 200, 20)
        assert r["approx"]["draft_ms"] == 1.5 and r["order"] == 1 and r["score"] == 0.0
        assert 0 <= r["ttft_s"] <= r["latency_s"] and len({x["attempt"] for x in recs}) == 1
    else:
        assert [r["turn"] for r in recs] == [1, 2] and "server gone" in recs[1]["error"]
        assert not usable(recs[1]) and usable(recs[0])


def test_report_only_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    from specapprox_vllm.tools.eval.multiturn import main

    out = tmp_path / "mt.json"
    records = [rec(s, 0, t, 1.0, float(t), cached=10, attempt=s) for s in ("none", "snapkv@128")
               for t in (1, 2, 3)]
    out.with_suffix(".records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["--report-only", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"command", "machine", "args", "summary", "order_note"} <= set(result)
    rows = result["summary"]["rows"]
    assert [r["setting"] for r in rows] == ["none", "snapkv@128"]
    assert rows[1]["turns"]["3"]["latency_vs_turn1"] == pytest.approx(3.0)
    assert out.with_suffix(".md").read_text().count("\n| ") == 6
    assert out.with_suffix(".png").stat().st_size > 0

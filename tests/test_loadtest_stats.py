"""The load tester's numbers, against naive references computed here: percentiles (numpy and
a hand-worked case), TTFT/ITL/TPOT from a scripted SSE stream with a fake clock, goodput,
throughput, approximation sums, failure breakdown; plus its argument guards."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from specapprox_vllm.tools.loadtest import client as lt_client
from specapprox_vllm.tools.loadtest.cli import UsageError, main, parse_settings, root_url
from specapprox_vllm.tools.loadtest.prompts import load_dataset
from specapprox_vllm.tools.loadtest.stats import (
    RequestRecord,
    is_good,
    parse_goodput,
    percentile,
    summarize,
)


def test_percentile_matches_numpy_and_hand_worked_values() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert math.isclose(percentile([1.0, 2.0, 3.0, 4.0], 90), 3.7)
    assert percentile([7.0], 99) == 7.0
    rng = random.Random(3)
    for n in (2, 5, 17, 100):
        xs = [rng.uniform(0, 1000) for _ in range(n)]
        for p in (0, 1, 50, 90, 99, 100):
            assert math.isclose(percentile(xs, p), float(np.percentile(xs, p)), rel_tol=1e-12)
    with pytest.raises(ValueError):
        percentile([], 50)


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class _FakeStream:
    """An httpx-like response whose lines arrive at scripted times."""

    def __init__(self, events: list[tuple[float, str]], clock: _Clock) -> None:
        self.events, self.clock = events, clock

    async def aiter_lines(self):
        for t, line in self.events:
            self.clock.now = t
            yield line
            yield ""


def _chunk(text: str | None = None, usage: dict | None = None, role: bool = False) -> str:
    delta: dict = {"role": "assistant", "content": ""} if role else {"content": text}
    obj: dict = {"choices": [] if usage else [{"index": 0, "delta": delta}]}
    if usage:
        obj["usage"] = usage
    return "data: " + json.dumps(obj)


async def test_stream_timings_follow_the_vllm_definitions(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(lt_client.time, "perf_counter", clock)
    approx = {"method": "none", "applied": False, "prompt_tokens_in": 100,
              "prompt_tokens_kept": 100}
    usage = {"prompt_tokens": 100, "completion_tokens": 5, "approx": approx}
    # The role chunk carries no text; one chunk carries two tokens ("ld" + "!").
    script = [(0.5, _chunk(role=True)), (1.0, _chunk("Hel")), (1.25, _chunk("lo")),
              (1.75, _chunk(" wor")), (2.0, _chunk("ld!")), (2.1, _chunk(usage=usage)),
              (2.2, ": ping"), (2.3, "data: [DONE]")]
    rec = RequestRecord(index=0, setting="x")
    await lt_client._read_stream(_FakeStream(script, clock), rec, 0.0)

    token_times = [t for t, line in script if '"content": "' in line and
                   '"content": ""' not in line]
    assert rec.success and rec.text == "Hello world!"
    assert rec.ttft == token_times[0] == 1.0
    assert rec.itl == [b - a for a, b in zip(token_times, token_times[1:], strict=False)]
    # TPOT uses usage's token count (5), not the number of chunks (4).
    assert rec.tpot == (token_times[-1] - token_times[0]) / (5 - 1)
    assert rec.prompt_tokens == 100 and rec.completion_tokens == 5 and rec.approx == approx


async def test_stream_errors_and_truncation_are_failures(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(lt_client.time, "perf_counter", clock)
    rec = RequestRecord(index=0, setting="x")
    err = {"error": {"message": "boom", "type": "InternalServerError", "code": 500}}
    await lt_client._read_stream(_FakeStream([(1.0, _chunk("a")), (2.0, "data: " + json.dumps(
        err))], clock), rec, 0.0)
    assert not rec.success and rec.error_type == "InternalServerError" and rec.error == "boom"
    rec = RequestRecord(index=1, setting="x")
    await lt_client._read_stream(_FakeStream([(1.0, _chunk("a"))], clock), rec, 0.0)
    assert not rec.success and rec.error_type == "StreamIncomplete"


def _records(seed: int = 1, n: int = 40) -> list[RequestRecord]:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        ok = rng.random() > 0.2
        out = rng.choice([0, 1, 2, 16, 64]) if ok else None
        ttft = rng.uniform(0.05, 2.0) if ok else None
        last = ttft + rng.uniform(0.0, 3.0) if ok else None
        recs.append(RequestRecord(
            index=i, setting="s", success=ok, status=200 if ok else rng.choice([400, 503]),
            error_type=None if ok else rng.choice(["BadRequestError", "ServiceUnavailable"]),
            ttft=ttft, last_token=last, e2e=(last + 0.001) if ok else rng.uniform(0, 1),
            itl=[rng.uniform(0.01, 0.2) for _ in range(max((out or 1) - 1, 0))] if ok else [],
            prompt_tokens=rng.randint(10, 3000) if ok else None, completion_tokens=out,
            approx={"method": "speckv", "applied": i % 2 == 0, "prompt_tokens_in": 100 + i,
                    "prompt_tokens_kept": 50 + i, "kv_entries_kept": 256 if i % 2 == 0 else None,
                    "draft_tokens": 8, "draft_ms": float(i), "select_ms": 0.5} if ok else None))
    return recs


def test_summary_against_naive_loops() -> None:
    recs = _records()
    slo = {"ttft": 1000.0, "tpot": 150.0}
    s = summarize(recs, 12.5, slo)
    ok = [r for r in recs if r.success]
    assert s["completed"] == len(ok) and s["failed"] == len(recs) - len(ok)
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.completion_tokens for r in ok)
    assert s["total_input_tokens"] == total_in and s["total_output_tokens"] == total_out
    assert math.isclose(s["request_throughput"], len(ok) / 12.5)
    assert math.isclose(s["output_throughput"], total_out / 12.5)
    assert math.isclose(s["total_token_throughput"], (total_in + total_out) / 12.5)
    # TPOT only over requests with > 1 output token.
    tpots = [(r.last_token - r.ttft) / (r.completion_tokens - 1) * 1000 for r in ok
             if r.completion_tokens > 1]
    assert s["tpot_ms"]["count"] == len(tpots)
    assert math.isclose(s["tpot_ms"]["mean"], sum(tpots) / len(tpots))
    assert math.isclose(s["tpot_ms"]["p99"], float(np.percentile(tpots, 99)))
    itls = [g * 1000 for r in ok for g in r.itl]
    assert math.isclose(s["itl_ms"]["median"], float(np.median(itls)))
    ttfts = [r.ttft * 1000 for r in ok]
    assert math.isclose(s["ttft_ms"]["p90"], float(np.percentile(ttfts, 90)))
    assert math.isclose(s["ttft_ms"]["std"], float(np.std(ttfts)))
    # Goodput: vLLM's rule, TPOT of a <= 1-token reply counts as 0.
    good = 0
    for r in ok:
        tpot = (r.last_token - r.ttft) / (r.completion_tokens - 1) \
            if r.completion_tokens > 1 else 0.0
        good += r.ttft * 1000 <= slo["ttft"] and tpot * 1000 <= slo["tpot"]
    assert s["goodput"]["good_requests"] == good
    assert math.isclose(s["goodput"]["request_goodput"], good / 12.5)
    # Approximation sums and failure breakdown.
    a = s["approx"]
    assert a["reported"] == len(ok) and a["methods"] == {"speckv": len(ok)}
    assert a["applied"] == sum(1 for r in ok if r.index % 2 == 0)
    assert a["prompt_tokens_in"]["sum"] == sum(100 + r.index for r in ok)
    assert a["prompt_kept_ratio"] == sum(50 + r.index for r in ok) / sum(100 + r.index
                                                                          for r in ok)
    assert a["kv_entries_kept"]["count"] == a["applied"]
    failed = [r for r in recs if not r.success]
    assert s["failures"]["by_status"] == {
        str(c): sum(1 for r in failed if r.status == c) for c in {r.status for r in failed}}
    assert sum(s["failures"]["by_type"].values()) == len(failed)


def test_goodput_rules() -> None:
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:9000"]) == {
        "ttft": 500.0, "tpot": 50.0, "e2el": 9000.0}
    for bad in (["ttft"], ["foo:1"], ["ttft:0"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    streamless = RequestRecord(index=0, setting="s", success=True, e2e=0.1, completion_tokens=3)
    assert not is_good(streamless, {"ttft": 1e9})      # no TTFT cannot meet a TTFT SLO
    assert is_good(streamless, {"e2el": 100.0})
    one_token = RequestRecord(index=0, setting="s", success=True, ttft=0.2, last_token=0.2,
                              e2e=0.2, completion_tokens=1)
    assert is_good(one_token, {"tpot": 0.001})


def test_settings_parsing() -> None:
    assert parse_settings(None, None) == [("default", None)]
    assert parse_settings('{"method": "speckv", "kv_budget": 256}', None) == [
        ("speckv(kv_budget=256)", {"method": "speckv", "kv_budget": 256})]
    assert [lbl for lbl, _ in parse_settings(None, "none, specpc,speckv")] == [
        "none", "specpc", "speckv"]
    js = parse_settings(None, '["none", {"method": "speckv", "kv_budget": 64}, "none"]')
    assert [lbl for lbl, _ in js] == ["none", "speckv(kv_budget=64)", "none#2"]
    for approx, compare in (("{}", "none"), ("[1]", None), (None, "[{}]"), (None, "[")):
        with pytest.raises(UsageError):
            parse_settings(approx, compare)


def test_only_loopback_unless_allowed(capsys) -> None:
    assert root_url("http://127.0.0.1:8000/v1/", False) == "http://127.0.0.1:8000"
    assert root_url("http://localhost:8000", False) == "http://localhost:8000"
    assert root_url("http://127.3.2.1:9", False) == "http://127.3.2.1:9"
    assert root_url("http://[::1]:8000", False) == "http://[::1]:8000"
    for url in ("http://10.0.0.1:8000", "http://example.com", "http://192.168.1.2",
                "ftp://127.0.0.1"):
        with pytest.raises(UsageError):
            root_url(url, False)
    assert root_url("http://server:8000", True) == "http://server:8000"
    # The CLI stops before any traffic: exit status 2 and a one-line reason.
    assert main(["--base-url", "http://10.1.2.3:8000", "--disable-tqdm"]) == 2
    assert "non-loopback" in capsys.readouterr().err


def test_dataset_loading(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "b"}], '
                    '"output_len": 5}\n')
    rows = load_dataset(path, 5, 7, 0, shuffle=False)
    assert [(r.text, r.output_len) for r in rows] == [("a", 7), (None, 5), ("a", 7),
                                                       (None, 5), ("a", 7)]
    assert rows[1].as_messages() == [{"role": "user", "content": "b"}]
    path.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="needs a 'prompt'"):
        load_dataset(path, 1, 7, 0, shuffle=False)


async def test_arrivals_are_poisson_and_concurrency_is_capped(monkeypatch) -> None:
    """Inter-arrival sleeps are the seeded exponential draws (a Poisson process at the given
    rate), and never more than ``max_concurrency`` requests are in flight."""
    import asyncio

    import httpx

    from specapprox_vllm.tools.loadtest.client import RunConfig, run_setting
    from specapprox_vllm.tools.loadtest.prompts import Prompt

    state = {"now": 0, "peak": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await real_sleep(0.01)
        state["now"] -= 1
        usage = {"prompt_tokens": 3, "completion_tokens": 1}
        body = f"data: {json.dumps({'choices': [{'delta': {'content': 'x'}}]})}\n\n" \
               f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    real_sleep = asyncio.sleep
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(lt_client.asyncio, "sleep", fake_sleep)
    prompts = [Prompt(text="p", messages=None, output_len=1) for _ in range(12)]
    cfg = RunConfig(root_url="http://127.0.0.1:1", backend="chat", model="m",
                    max_concurrency=3, request_rate=4.0, seed=9)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        records, _ = await run_setting(client, cfg, prompts, "s", {"method": "none"})
    rng = random.Random(9)
    assert slept == [rng.expovariate(4.0) for _ in range(11)]
    assert state["peak"] == 3 and all(r.success for r in records)
    assert [r.completion_tokens for r in records] == [1] * 12

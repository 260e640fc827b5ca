"""SpecKV and its baselines end to end over HTTP with the ``openai`` SDK, on the real server
(SmolLM2 target, SmolLM2 as its own draft): nothing evicted equals the plain target, a 3k
needle survives C = 256, usage.approx carries the engine's own KV accounting, and the
target's KV usage (vLLM's Prometheus gauge) returns to idle."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from tests.test_specpc_server import MODEL, chat

pytestmark = pytest.mark.server


def test_nothing_evicted_equals_the_plain_target(client: openai.OpenAI, needle) -> None:
    plain = chat(client, needle.messages, {"method": "none"})
    length = plain.usage.prompt_tokens
    for method in ("speckv", "snapkv", "streamingllm"):
        approx = {"method": method, "kv_budget": length - 1}
        if method == "speckv":  # a lookahead shorter than the answer, or nothing is evicted
            approx["lookahead"] = 8  # (the default n = max_tokens = 24 is the whole answer)
        resp = chat(client, needle.messages, approx)
        a = resp.usage.model_extra["approx"]
        assert a["applied"] is True and a["kv_entries_kept"] == length - 1
        assert resp.choices[0].message.content == plain.choices[0].message.content, method


def test_needle_at_kv_budget_256(client: openai.OpenAI, needle) -> None:
    """The default server is its own draft: the first n + 1 tokens are the target's own
    (the lookahead phase, ``lookahead_source: self``), the rest decode from C entries."""
    resp = chat(client, needle.messages, {"method": "speckv", "kv_budget": 256,
                                          "lookahead": 8})
    assert needle.answer in resp.choices[0].message.content
    a = resp.usage.model_extra["approx"]
    assert a["method"] == "speckv" and a["applied"] is True
    assert a["kv_entries_kept"] == 256 and a["prompt_tokens_in"] == resp.usage.prompt_tokens
    assert a["draft_tokens"] == 8 and a["lookahead_source"] == "self"
    assert a["score_ms"] > 0 and a["select_ms"] > 0 and a["kv_loads"] == 1
    bs = 128  # vLLM's CPU default block size (configs/default.yaml leaves it unset)
    assert a["kv_blocks_before"] == -(-a["prompt_tokens_in"] // bs)
    # the decode request: C entries, P[L-1] and the 9 tokens already answered
    assert a["kv_blocks_after"] == -(-(256 + 1 + 9) // bs)
    assert a["kv_bytes_saved"] == (a["kv_blocks_before"] - a["kv_blocks_after"]) * bs * (
        2 * 30 * 3 * 64 * 4)  # K and V, 30 layers, 3 KV heads, head dim 64, fp32

    snap = chat(client, needle.messages, {"method": "snapkv", "kv_budget": 256})
    s = snap.usage.model_extra["approx"]
    assert s["applied"] is True and s["kv_entries_kept"] == 256 and s["draft_tokens"] == 0

    # A lookahead as long as the answer: the whole answer is the lookahead, exact.
    full = chat(client, needle.messages, {"method": "none"})
    whole = chat(client, needle.messages, {"method": "speckv", "kv_budget": 256,
                                           "lookahead": 24})
    w = whole.usage.model_extra["approx"]
    assert not w["applied"] and w["reason"] == "answer_within_lookahead"
    assert whole.choices[0].message.content == full.choices[0].message.content


def test_streamed_speckv_matches_and_reports_usage(client: openai.OpenAI, needle) -> None:
    approx = {"method": "speckv", "kv_budget": 256, "lookahead": 8}
    resp = chat(client, needle.messages, approx)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=needle.messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"approx": approx}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == resp.choices[0].message.content
    a = chunks[-1].usage.model_extra["approx"]
    assert a["draft_tokens"] == 8 and a["kv_blocks_after"] == 3
    assert chunks[-1].usage.prompt_tokens == resp.usage.prompt_tokens


def test_cascade_and_completions_endpoint(client: openai.OpenAI, needle) -> None:
    resp = chat(client, needle.messages, {"method": "speckv_pc", "prompt_budget": 1024,
                                          "kv_budget": 256})
    a = resp.usage.model_extra["approx"]
    assert a["applied"] and a["prompt_tokens_kept"] <= 1024 and a["kv_entries_kept"] == 256
    assert a["draft_tokens"] == 24  # SpecKV's n: max_tokens (24), under the cap (32)
    comp = client.completions.create(model=MODEL, prompt="word " * 600, max_tokens=4,
                                     temperature=0,
                                     extra_body={"vllm_xargs": {"approx_method": "snapkv",
                                                                "approx_kv_budget": 128}})
    c = comp.usage.model_extra["approx"]
    assert c["method"] == "snapkv" and c["applied"] and c["kv_entries_kept"] == 128


def test_prompt_logprobs_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 300, max_tokens=2,
                                  extra_body={"prompt_logprobs": 1,
                                              "approx": {"method": "snapkv",
                                                         "kv_budget": 64}})
    assert "prompt_logprobs" in e.value.body["message"]


def _kv_usage(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    values = [float(m.group(1)) for m in re.finditer(
        r'^specapprox_engine_kv_cache_usage_ratio\{engine="target"\} (\S+)$', text, re.M)]
    assert values, "no target KV usage gauge on /metrics"
    return values[0]


def test_kv_usage_returns_to_idle(client: openai.OpenAI, server, needle) -> None:
    for method in ("speckv", "snapkv", "streamingllm"):
        chat(client, needle.messages, {"method": method, "kv_budget": 128})
    deadline = time.time() + 30
    while _kv_usage(server.base_url) != 0.0 and time.time() < deadline:
        time.sleep(0.5)
    assert _kv_usage(server.base_url) == 0.0


def test_ratio_budgets_on_a_4k_prompt(client: openai.OpenAI, server, tokenizer) -> None:
    """API.md's ratio budgets through the real engines: ``kv_ratio: 0.1`` on a ~4k-token prompt
    keeps round(0.1 L) entries per layer and KV head, ``usage.approx`` reports that budget,
    the flat ``vllm_xargs`` spelling works too, and each request lands in the kept-fraction
    histogram of its method (``specapprox_kept_fraction``) with its own share."""
    from prometheus_client.parser import text_string_to_metric_families

    from specapprox_vllm.tools.eval.needle import make_needle_case

    case = make_needle_case(tokenizer, 4000, seed=5, depth=0.4)

    def fraction_sums() -> dict[str, tuple[float, float]]:
        text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
        out: dict[str, list[float]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name in ("specapprox_kept_fraction_sum", "specapprox_kept_fraction_count"):
                    out.setdefault(s.labels["method"], [0.0, 0.0])[
                        s.name.endswith("_count")] = s.value
        return {m: (v[0], v[1]) for m, v in out.items()}

    before = fraction_sums()
    resp = chat(client, case.messages, {"method": "speckv", "kv_ratio": 0.1, "lookahead": 8})
    a = resp.usage.model_extra["approx"]
    n = resp.usage.prompt_tokens
    assert 3900 <= n <= 4100 and a["prompt_tokens_in"] == n
    want = int(0.1 * n + 0.5)
    assert a["applied"] is True and a["kv_budget"] == want and a["kv_entries_kept"] == want

    flat = client.chat.completions.create(
        model=MODEL, messages=case.messages, max_tokens=8, temperature=0,
        extra_body={"vllm_xargs": {"approx_method": "snapkv", "approx_kv_ratio": 0.05}})
    f = flat.usage.model_extra["approx"]
    assert f["method"] == "snapkv" and f["kv_entries_kept"] == f["kv_budget"] == int(
        0.05 * n + 0.5)

    pc = chat(client, case.messages, {"method": "specpc", "prompt_ratio": 0.25})
    p = pc.usage.model_extra["approx"]
    assert p["prompt_budget"] == int(0.25 * n + 0.5) and p["applied"] is True
    assert p["prompt_tokens_kept"] <= p["prompt_budget"]

    after = fraction_sums()
    moved = {m: (after[m][0] - before.get(m, (0.0, 0.0))[0],
                 after[m][1] - before.get(m, (0.0, 0.0))[1]) for m in ("speckv", "snapkv",
                                                                      "specpc")}
    assert moved["speckv"] == pytest.approx((want / n, 1))
    assert moved["snapkv"] == pytest.approx((f["kv_entries_kept"] / n, 1))
    assert moved["specpc"] == pytest.approx((p["prompt_tokens_kept"] / n, 1))


def test_prefix_cache_hits_are_reported_for_kv_methods(client: openai.OpenAI, needle) -> None:
    """``usage.prompt_tokens_details.cached_tokens`` (on by default) counts the user's prompt
    tokens the prefix cache served. For a KV method that is the scoring request's hits: a
    repeated document is read from the cache up to the whole block before the first scoring
    row ``L - W - 1`` (vLLM's CPU blocks are 128 tokens), and only the rest is computed; the
    hits are not thrown away for a second, uncached prefill (which reported 0 before)."""
    block, window = 128, 32  # configs/methods: speckv and snapkv score the last W + 1 rows
    for approx, first_row in (
            ({"method": "none"}, lambda n: n - 1),  # vLLM recomputes at least the last token
            ({"method": "snapkv", "kv_budget": 128}, lambda n: n - window - 1),
            ({"method": "speckv", "kv_budget": 128, "lookahead": 4}, lambda n: n - window - 1)):
        chat(client, needle.messages, approx)  # warm: the document is now cached
        again = chat(client, needle.messages, approx)
        n = again.usage.prompt_tokens
        cached = again.usage.prompt_tokens_details.cached_tokens
        assert cached == first_row(n) // block * block, (approx, cached, n)


def test_cache_salt_reaches_the_scoring_requests(client: openai.OpenAI, needle) -> None:
    """A user's ``cache_salt`` isolates their prefix blocks (vLLM's contract): the scoring
    request of a KV method, and the draft run of a prompt method, carry it too. A new salt
    reads nothing from the cache; the same salt again reads its own blocks."""
    block, window = 128, 32
    for approx, cached_of in (
            ({"method": "snapkv", "kv_budget": 128},
             lambda u: u.prompt_tokens_details.cached_tokens),
            ({"method": "specpc", "prompt_budget": 1024},  # the draft pass's hits: draft_ms
             None)):
        salt = f"t-{approx['method']}-{time.time_ns()}"

        def salted(s: str, approx: dict = approx):
            return client.chat.completions.create(
                model=MODEL, messages=needle.messages, max_tokens=24, temperature=0,
                extra_body={"approx": approx, "cache_salt": s})

        first, again, other = salted(salt), salted(salt), salted(salt + "-other")
        n = first.usage.prompt_tokens
        if cached_of is not None:
            assert cached_of(first.usage) == 0 and cached_of(other.usage) == 0
            assert cached_of(again.usage) == (n - window - 1) // block * block
        else:  # the draft pass reads its salted blocks: far faster the second time
            ms = [r.usage.model_extra["approx"]["draft_ms"] for r in (first, again, other)]
            assert ms[1] < 0.5 * ms[0] and ms[2] > 2 * ms[1], ms

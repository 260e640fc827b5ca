"""SpecPC end to end over HTTP with the ``openai`` SDK: a real server with target and draft
engines (SmolLM2 both), a needle prompt whose answer must survive compression."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

pytestmark = pytest.mark.server
MODEL = "SmolLM2-135M-Instruct"


def chat(client: openai.OpenAI, messages, approx=None, **kw):
    extra = {"approx": approx} if approx is not None else None
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                          temperature=0, extra_body=extra, **kw)


def test_needle_survives_specpc_at_1024(client: openai.OpenAI, needle) -> None:
    resp = chat(client, needle.messages, {"method": "specpc", "prompt_budget": 1024})
    assert needle.answer in resp.choices[0].message.content
    a = resp.usage.model_extra["approx"]
    assert a["method"] == "specpc" and a["applied"] is True
    assert a["prompt_tokens_in"] == resp.usage.prompt_tokens > 2900
    assert a["prompt_tokens_kept"] <= 1024
    assert a["draft_tokens"] == 1 and a["draft_ms"] > 0 and a["select_ms"] >= 0

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=needle.messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"approx": {"method": "specpc", "prompt_budget": 1024}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == resp.choices[0].message.content
    assert chunks[-1].usage.model_extra["approx"]["prompt_tokens_kept"] == a["prompt_tokens_kept"]


def test_none_is_the_plain_target_and_skips_the_draft(client: openai.OpenAI, needle) -> None:
    plain = chat(client, needle.messages)
    none = chat(client, needle.messages, {"method": "none"})
    assert none.choices[0].message.content == plain.choices[0].message.content
    a = none.usage.model_extra["approx"]
    assert (a["applied"], a["draft_tokens"], a["draft_ms"]) == (False, 0, 0.0)


def test_short_prompt_is_served_unchanged_and_says_so(client: openai.OpenAI) -> None:
    resp = chat(client, [{"role": "user", "content": "Hi there"}], {"method": "specpc"})
    a = resp.usage.model_extra["approx"]
    assert a["applied"] is False and a["reason"] == "prompt_within_budget"
    assert a["prompt_tokens_kept"] == a["prompt_tokens_in"] == resp.usage.prompt_tokens


def test_mixed_concurrent_requests_each_get_their_settings(client: openai.OpenAI,
                                                           needle) -> None:
    settings = [None, {"method": "specpc", "prompt_budget": 512},
                {"method": "none"}, {"method": "specpc", "prompt_budget": 1500},
                {"method": "specpc", "prompt_budget": 768, "window": 32, "lookahead": 3}]
    with ThreadPoolExecutor(len(settings)) as pool:
        results = list(pool.map(lambda s: chat(client, needle.messages, s), settings))
    for s, resp in zip(settings, results, strict=True):
        a = resp.usage.model_extra["approx"]
        if s is None or s["method"] == "none":
            assert a["method"] == "none" and a["prompt_tokens_kept"] == a["prompt_tokens_in"]
        else:
            assert a["method"] == "specpc" and a["applied"]
            assert a["prompt_tokens_kept"] == s["prompt_budget"]
            assert a["draft_tokens"] == s.get("lookahead", 1)


@pytest.mark.parametrize(("approx", "param"), [
    ({"method": "specpc", "prompt_budget": 0}, "approx.prompt_budget"),
    ({"method": "nope"}, "approx.method"),
    ({"method": "specpc", "prompt_budget": 32, "window": 64}, "approx.prompt_budget"),
    ({"method": "specpc", "start_layer": 99}, "approx.start_layer"),
    ({"method": "specpc", "kernel": 0}, "approx.kernel"),
])
def test_bad_settings_are_400_naming_the_field(client: openai.OpenAI, approx, param) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, [{"role": "user", "content": "hi"}], approx)
    assert e.value.body["param"] == param
    assert e.value.body["message"].startswith(param)

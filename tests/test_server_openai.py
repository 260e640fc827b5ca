"""The real server on the embedded SmolLM2, driven by the official ``openai`` SDK.

Independent expectations: the SDK must parse every response; greedy output must equal vLLM's
offline ``LLM.generate``; errors must arrive as the SDK's typed exceptions with OpenAI's shape.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from tests.conftest import ROOT, require_model
from tests.server_utils import ServerProcess

pytestmark = pytest.mark.server
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(live_server: ServerProcess) -> ServerProcess:
    return live_server


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, content: str, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_models_and_health(server: ServerProcess, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_chat_greedy_answers_and_reports_usage(client: openai.OpenAI) -> None:
    resp = ask(client, "What is the capital of France?", max_tokens=16, temperature=0)
    assert "Paris" in resp.choices[0].message.content
    usage = resp.usage
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    approx = usage.model_extra["approx"]
    assert approx["method"] == "none" and approx["applied"] is False
    assert approx["prompt_tokens_in"] == approx["prompt_tokens_kept"] == usage.prompt_tokens


def test_streamed_chat_equals_non_streamed(client: openai.OpenAI) -> None:
    kw = dict(max_tokens=20, temperature=0)
    full = ask(client, "Name three colours.", **kw).choices[0].message.content
    chunks = list(ask(client, "Name three colours.", stream=True,
                      stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_extra["approx"]["method"] == "none"


def test_completions_n_stop_seed_and_limits(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                     temperature=1.0, n=2, seed=7)
    assert len(resp.choices) == 2
    again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                      temperature=1.0, n=2, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in resp.choices]
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30,
                                        temperature=0, stop=[","])
    assert "," not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    capped = ask(client, "Tell me a long story.", max_completion_tokens=5, temperature=0)
    assert capped.usage.completion_tokens == 5 and capped.choices[0].finish_reason == "length"
    top = ask(client, "Hi", max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    assert len(top.choices[0].logprobs.content) == 3
    assert all(len(t.top_logprobs) == 2 for t in top.choices[0].logprobs.content)
    p = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, top_p=0.5,
                                  temperature=0.7)
    assert p.usage.completion_tokens == 4


def test_greedy_equals_vllm_offline_generate(client: openai.OpenAI, tmp_path) -> None:
    prompts = ["The capital of France is", "def fibonacci(n):",
               "A short poem about the sea:\n"]
    out = tmp_path / "offline.json"
    subprocess.run([sys.executable, str(ROOT / "tests" / "offline_generate.py"),
                    str(require_model()), str(out), *prompts], check=True, cwd=ROOT,
                   timeout=600)
    reference = json.loads(out.read_text())
    for ref in reference:
        resp = client.completions.create(model=MODEL, prompt=ref["prompt"], max_tokens=24,
                                         temperature=0, extra_body={"return_token_ids": True})
        assert resp.choices[0].text == ref["text"], ref["prompt"]
        assert resp.choices[0].model_extra["token_ids"] == ref["token_ids"]


def test_errors_have_openai_shape(server: ServerProcess, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "hi", max_tokens=-1)
    assert e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "hi", extra_body={"approx": {"method": "none", "kv_budget": 3}})
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "hi", extra_body={"approx": {"method": "bogus"}})
    assert e.value.body["param"] == "approx.method"
    r = httpx.post(f"{server.base_url}/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_approx_via_vllm_xargs_and_precedence(client: openai.OpenAI) -> None:
    resp = ask(client, "hi", max_tokens=2, extra_body={"vllm_xargs": {"approx_method": "none"}})
    assert resp.usage.model_extra["approx"]["method"] == "none"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "hi", max_tokens=2,
            extra_body={"vllm_xargs": {"approx_method": "bogus"}})
    assert e.value.body["param"] == "approx.method"
    # `approx` wins over vllm_xargs
    resp = ask(client, "hi", max_tokens=2, extra_body={
        "vllm_xargs": {"approx_method": "bogus"}, "approx": {"method": "none"}})
    assert resp.usage.model_extra["approx"]["method"] == "none"

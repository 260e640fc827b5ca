"""The ``approx`` request/response extension and the auth layer, against a stand-in for vLLM's
app (the real server is covered in test_server_openai.py). The ``openai`` SDK is the client,
so every rewritten response must still parse."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from server.app import BearerAuthMiddleware
from server.approx_api import ApproxMiddleware, approx_usage, fill_param
from server.engine_client import CURRENT_REQUEST
from specapprox_vllm.frontend.scheduler import ApproxStats, DraftScheduler
from specapprox_vllm.policies import load_method_defaults
from tests.conftest import ROOT

DEFAULTS = load_method_defaults(ROOT / "configs" / "methods")


def fake_vllm_app() -> FastAPI:
    """Echoes what it received and what the middleware published, like an engine would."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        ctx = CURRENT_REQUEST.get()
        ctx.stats.append(ApproxStats(ctx.config.method, False, 7, 7))
        seen = {"body": body, "config": ctx.config.model_dump()}
        usage = {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
        msg = {"role": "assistant", "content": json.dumps(seen)}
        if not body.get("stream"):
            return JSONResponse({"id": "x", "object": "chat.completion", "created": 0,
                                 "model": "m", "usage": usage,
                                 "choices": [{"index": 0, "message": msg,
                                              "finish_reason": "stop"}]})

        async def events():
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
            yield "data: " + json.dumps({**chunk, "choices": [
                {"index": 0, "delta": msg, "finish_reason": "stop"}]}) + "\n\n"
            yield "data: " + json.dumps({**chunk, "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class _Scheduler(DraftScheduler):
    """Offers every method, so that only validation is under test here."""

    @property
    def supported_methods(self) -> tuple[str, ...]:
        return tuple(DEFAULTS)


def make_client(api_key: str | None = None, max_body: int = 1 << 20) -> openai.OpenAI:
    asgi = ApproxMiddleware(fake_vllm_app(), _Scheduler(), "none", DEFAULTS, max_body)
    if api_key:
        asgi = BearerAuthMiddleware(asgi, api_key)
    http = TestClient(asgi, base_url="http://t")  # an httpx.Client that calls the ASGI app
    return openai.OpenAI(base_url="http://t/v1", api_key=api_key or "x", http_client=http,
                         max_retries=0)


def chat(client: openai.OpenAI, **kw):
    return client.chat.completions.create(model="m", messages=[{"role": "user",
                                                                "content": "hi"}], **kw)


def seen(resp) -> dict:
    return json.loads(resp.choices[0].message.content)


def test_approx_object_is_validated_and_removed_from_the_body() -> None:
    resp = chat(make_client(), extra_body={"approx": {"method": "speckv", "kv_budget": 512}})
    s = seen(resp)
    assert "approx" not in s["body"]
    assert s["config"]["method"] == "speckv" and s["config"]["kv_budget"] == 512
    assert s["config"]["window"] == DEFAULTS["speckv"]["window"]  # YAML default
    assert resp.usage.model_extra["approx"] == {
        "method": "speckv", "applied": False, "prompt_tokens_in": 7, "prompt_tokens_kept": 7,
        "kv_entries_kept": None, "draft_tokens": 0, "draft_ms": 0.0, "select_ms": 0.0}


def test_flat_vllm_xargs_and_precedence() -> None:
    c = make_client()
    s = seen(chat(c, extra_body={"vllm_xargs": {"approx_method": "specpc",
                                                "approx_prompt_budget": 900, "other": 1}}))
    assert s["config"]["method"] == "specpc" and s["config"]["prompt_budget"] == 900
    assert s["body"]["vllm_xargs"] == {"other": 1}  # non-approx keys pass through
    s = seen(chat(c, extra_body={"vllm_xargs": {"approx_method": "specpc",
                                                "approx_prompt_budget": 900},
                                 "approx": {"prompt_budget": 1500}}))
    assert s["config"]["prompt_budget"] == 1500 and "vllm_xargs" not in s["body"]


def test_ratio_budgets_flat_and_nested() -> None:
    """``approx_kv_ratio`` in ``vllm_xargs`` is the same key; a request's ratio replaces the
    served absolute budget (YAML), and a ratio plus a budget across ``approx`` and the flat
    keys is one request giving both (400)."""
    c = make_client()
    s = seen(chat(c, extra_body={"vllm_xargs": {"approx_method": "speckv",
                                                "approx_kv_ratio": 0.1}}))
    assert s["config"]["kv_ratio"] == 0.1 and s["config"]["method"] == "speckv"
    s = seen(chat(c, extra_body={"approx": {"method": "speckv_pc", "prompt_ratio": 0.25,
                                            "kv_budget": 64}}))
    assert s["config"]["prompt_ratio"] == 0.25 and s["config"]["kv_budget"] == 64
    assert "kv_ratio" not in s["config"]
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, extra_body={"vllm_xargs": {"approx_kv_budget": 64},
                            "approx": {"method": "speckv", "kv_ratio": 0.1}})
    assert e.value.body["param"] == "approx.kv_ratio"
    assert "kv_budget" in e.value.body["message"]


def test_default_method_applies_when_no_approx_is_given() -> None:
    s = seen(chat(make_client()))
    assert s["config"]["method"] == "none"


@pytest.mark.parametrize(("approx", "param"), [
    ({"method": "bogus"}, "approx.method"),
    ({"method": "specpc", "prompt_budget": 0}, "approx.prompt_budget"),
    ({"method": "speckv", "kv_budget": "lots"}, "approx.kv_budget"),
    ({"method": "speckv", "kv_budget": 16, "window": 32}, "approx.kv_budget"),
    ({"method": "speckv", "typo_key": 1}, "approx.typo_key"),
    ({"method": 3}, "approx.method"),
    ("speckv", "approx"),
    # ratio budgets (API.md): in (0, 1], one per stage, only where the method has the budget
    ({"method": "speckv", "kv_ratio": 0.1, "kv_budget": 256}, "approx.kv_ratio"),
    ({"method": "specpc", "prompt_ratio": 0.2, "prompt_budget": 900}, "approx.prompt_ratio"),
    ({"method": "speckv", "kv_ratio": 0}, "approx.kv_ratio"),
    ({"method": "speckv", "kv_ratio": 1.5}, "approx.kv_ratio"),
    ({"method": "specpc", "kv_ratio": 0.1}, "approx.kv_ratio"),
    ({"method": "none", "prompt_ratio": 0.5}, "approx.prompt_ratio"),
])
def test_bad_settings_get_openai_400_naming_the_field(approx, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(make_client(), extra_body={"approx": approx})
    assert e.value.status_code == 400
    assert e.value.body["type"] == "BadRequestError"
    assert e.value.body["param"].startswith(param)


def test_streamed_usage_chunk_carries_approx() -> None:
    chunks = list(chat(make_client(), stream=True, stream_options={"include_usage": True},
                       extra_body={"approx": {"method": "snapkv"}}))
    assert chunks[-1].usage.model_extra["approx"]["method"] == "snapkv"
    assert all(c.usage is None for c in chunks[:-1])


def test_oversized_body_is_413() -> None:
    with pytest.raises(openai.APIStatusError) as e:
        chat(make_client(max_body=200), extra_body={"pad": "x" * 500})
    assert e.value.status_code == 413


@pytest.mark.parametrize(("raw", "word"), [
    (b'{"model":"m","messages":[{"role":"user","content":"\xff"}]}', "UTF-8"),
    (b'{"model":"m","seed":' + b"9" * 5000 + b"}", "4300"),
    (b'{"messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
])
def test_unparseable_bodies_get_openai_400_not_500(raw: bytes, word: str) -> None:
    asgi = ApproxMiddleware(fake_vllm_app(), _Scheduler(), "none", DEFAULTS, 1 << 22)
    r = TestClient(asgi, base_url="http://t").post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400 and word in err["message"]


def test_get_on_a_completion_path_is_an_openai_405() -> None:
    asgi = ApproxMiddleware(fake_vllm_app(), _Scheduler(), "none", DEFAULTS, 1 << 20)
    r = TestClient(asgi, base_url="http://t").get("/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["type"] == "MethodNotAllowed"


def test_fill_param_names_the_field_a_vllm_message_starts_with() -> None:
    def err(message: str, param: str | None = None) -> bytes:
        return json.dumps({"error": {"message": message, "type": "BadRequestError",
                                     "param": param, "code": 400}}).encode()

    def param(body: bytes, fields: tuple[str, ...]) -> str | None:
        return json.loads(fill_param(body, fields))["error"]["param"]

    assert param(err("n must be at least 1, got 0."), ("n", "prompt")) == "n"
    assert param(err("`top_k` must be 0 (disable), or at least 1"), ("top_k",)) == "top_k"
    assert param(err("n must be at least 1, got 0."), ("prompt",)) is None  # not sent
    assert param(err("Token id 9 is out of vocabulary"), ("prompt",)) is None
    assert param(err("n must be at least 1", "x"), ("n",)) == "x"  # kept
    assert fill_param(b"not json", ("n",)) == b"not json"


def test_bearer_auth_is_constant_time_and_openai_shaped() -> None:
    ok = make_client(api_key="s3cret")
    assert seen(chat(ok))["config"]["method"] == "none"
    bad = make_client(api_key="s3cret")
    bad.api_key = "wrong"
    with pytest.raises(openai.AuthenticationError) as e:
        chat(bad)
    assert e.value.body["type"] == "AuthenticationError"


def test_usage_aggregates_several_engine_requests() -> None:
    a = ApproxStats("specpc", True, 100, 40, draft_tokens=1, draft_ms=1.5)
    b = ApproxStats("specpc", False, 10, 10, draft_ms=0.25)
    out = approx_usage([a, b])
    assert (out["applied"], out["prompt_tokens_in"], out["prompt_tokens_kept"]) == (True, 110, 50)
    assert out["draft_ms"] == 1.75

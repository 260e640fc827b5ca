"""Input-validation battery against the real server (issue 8, part 1).

Every case sends one bad request over HTTP to the shared ``live_server`` (default config:
SmolLM2 target and draft, no API key) and checks the answer: the HTTP status, OpenAI's error
shape ``{"error": {"message", "type", "param", "code"}}`` with ``code == status``, the error
``type``, the ``param`` where one is meaningful, a message that names the problem where that
matters (the context limit, the budget), and never a Python traceback. After the battery the
server must still answer a normal chat request.

The expectations are what the server does (probed), which is vLLM 0.32's OpenAI server plus
our ``approx`` layer (server/approx_api.py). Two spellings of the 400 ``type`` come from vLLM
itself and are asserted as such: ``"Bad Request"`` for errors of the request's pydantic model
(wrong types, missing fields, ranges declared on the model) and ``"BadRequestError"`` for
errors raised by its serving code and by our ``approx`` validation.

vLLM's pydantic errors name the field by its location, ``"param": "body.max_tokens"``; its
serving code and our layer name it plainly (``"max_tokens"``, ``"approx.kv_budget"``).

A few inputs are *tolerated* by vLLM's server and are asserted as such (``ACCEPTED``):
unknown top-level fields (ignored, with a warning in the server log), a missing ``model``
(the served model is used), pydantic's lax booleans (``"yes"``) and ``approx`` budgets at or
above the context length (the prompt is always within budget, so it is served without
approximation, as API.md says).

Two inputs vLLM tolerates and OpenAI refuses are refused here as OpenAI refuses them (issue
19, ``server/messages.py``): a message ``role`` outside OpenAI's list (vLLM would render
"wizard" as a turn of its own) and a message without the ``content`` its role requires; the
400 names ``messages[i].role`` / ``messages[i].content``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.server

MODEL = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
MAX_MODEL_LEN = 8192  # configs/default.yaml target.max_model_len
MAX_BODY_BYTES = 32 * 1024 * 1024  # server/app.py MAX_BODY_BYTES
ANY = object()  # "param" not checked
BR = "BadRequestError"  # raised by vLLM's serving code / our approx layer
BRV = "Bad Request"  # vLLM's handler for pydantic validation errors of the request model
JSON_CT = {"content-type": "application/json"}

# " hello" is one SmolLM2 token: 9500 of them exceed the 8192-token context.
LONG_TEXT = "hello" + " hello" * 9500


def chat(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": 2, "temperature": 0}
    body.update(kw)
    return body


def compl(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": "Hello", "max_tokens": 2,
                            "temperature": 0}
    body.update(kw)
    return body


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


@dataclass(frozen=True)
class Case:
    id: str
    body: Any  # bytes are sent as they are; anything else as JSON
    status: int
    type: Any  # a string, or ANY (not checked)
    param: Any = ANY  # None, a string, or ANY (not checked)
    path: str = CHAT
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON_CT))
    message: tuple[str, ...] = ()  # substrings the message must contain (case-insensitive)

    def content(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else raw(self.body)


def _nested(depth: int) -> bytes:
    return b'{"model":"' + MODEL.encode() + b'","messages":' + b"[" * depth + b"]" * depth + b"}"


CASES: list[Case] = [
    # --- not a JSON object at all
    Case("malformed_json", b"{not json", 400, BRV, message=("json",)),
    Case("truncated_json", b'{"model": "x", "messages": [', 400, BRV, message=("json",)),
    Case("empty_body", b"", 400, BRV),
    Case("json_list", [], 400, BRV),
    Case("json_list_compl", [compl()], 400, BRV, path=COMPL),
    Case("json_string", "hello", 400, BRV),
    Case("json_number", 42, 400, BRV),
    Case("json_null", None, 400, BRV),
    Case("non_utf8_chat",
         b'{"model":"' + MODEL.encode() + b'","messages":[{"role":"user","content":"\xff\xfe"}]}',
         400, BR, None, message=("UTF-8",)),
    Case("non_utf8_compl", b'{"model":"' + MODEL.encode() + b'","prompt":"caf\xe9"}', 400, BR,
         None, path=COMPL, message=("UTF-8",)),
    # Python's json reads NaN / Infinity; vLLM's sampling checks then refuse them.
    Case("nan_literal", raw(chat())[:-1] + b',"temperature":NaN}', 400, BR, "temperature",
         message=("finite",)),
    Case("infinity_literal", raw(compl())[:-1] + b',"top_p":Infinity}', 400, BR, "top_p",
         path=COMPL),
    Case("huge_integer_literal", raw(chat())[:-1] + b',"seed":' + b"9" * 5000 + b"}", 400, BR,
         None, message=("4300",)),
    Case("deeply_nested_json", _nested(100_000), 400, BR, None, message=("nested",)),
    Case("nested_500_deep_messages", _nested(500), 400, BRV, ANY),
    Case("wrong_content_type", raw(chat()), 400, BRV, None, headers={"content-type": "text/plain"},
         message=("application/json",)),
    # --- wrong types
    # --- wrong types (vLLM's pydantic errors: param is the location, "body.<field>")
    Case("messages_string", chat(messages="Hi"), 400, BRV, "body.messages"),
    Case("messages_object", chat(messages={"role": "user", "content": "Hi"}), 400, BRV,
         "body.messages"),
    Case("content_number", chat(messages=[{"role": "user", "content": 42}]), 400, BRV, ANY,
         message=("content",)),
    Case("max_tokens_string", chat(max_tokens="ten"), 400, BRV, "body.max_tokens"),
    Case("temperature_string", chat(temperature="hot"), 400, BRV, "body.temperature"),
    # pydantic's lax booleans take "yes"/"no"/"on"/"off"/"1"/"0" (see ACCEPTED); not "maybe"
    Case("stream_string", chat(stream="maybe"), 400, BRV, "body.stream"),
    Case("n_string", compl(n="two"), 400, BRV, "body.n", path=COMPL),
    Case("prompt_object", compl(prompt={"text": "Hi"}), 400, BRV, "body.prompt", path=COMPL),
    Case("seed_string", chat(seed="abc"), 400, BRV, "body.seed"),
    Case("logprobs_string_chat", chat(logprobs="maybe"), 400, BRV, "body.logprobs"),
    Case("model_number", chat(model=123), 400, BRV, "body.model"),
    # --- missing or empty
    Case("missing_messages", without(chat(), "messages"), 400, BRV, "body.messages"),
    Case("missing_prompt", without(compl(), "prompt"), 400, BR, "prompt", path=COMPL),
    Case("empty_messages", chat(messages=[]), 400, BR, None, message=("empty",)),
    Case("empty_prompt", compl(prompt=""), 400, BR, "prompt", path=COMPL),
    Case("message_without_role", chat(messages=[{"content": "Hi"}]), 400, BRV, ANY,
         message=("role",)),
    # --- where vLLM is looser than OpenAI (server/messages.py answers as OpenAI does)
    Case("unknown_role", chat(messages=[{"role": "wizard", "content": "Hi"}]), 400, BR,
         "messages[0].role", message=("wizard", "'user'")),
    Case("unknown_role_second_message",
         chat(messages=[{"role": "system", "content": "Be brief."},
                        {"role": "User", "content": "Hi"}]), 400, BR, "messages[1].role",
         message=("User",)),
    Case("user_without_content", chat(messages=[{"role": "user"}]), 400, BR,
         "messages[0].content", message=("missing", "messages[0].content")),
    Case("user_null_content", chat(messages=[{"role": "user", "content": None}]), 400, BR,
         "messages[0].content", message=("messages[0].content",)),
    Case("assistant_without_content_or_tool_calls",
         chat(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant"},
                        {"role": "user", "content": "Again"}]), 400, BR,
         "messages[1].content", message=("missing",)),
    # --- lengths and counts
    Case("negative_max_tokens", chat(max_tokens=-1), 400, BR, "max_tokens"),
    # vLLM validates max_completion_tokens as max_tokens, and names that
    Case("negative_max_completion_tokens", chat(max_completion_tokens=-5), 400, BR,
         "max_tokens"),
    Case("huge_max_tokens", chat(max_tokens=100_000), 400, BR, "max_tokens",
         message=(str(MAX_MODEL_LEN),)),
    Case("huge_max_tokens_compl", compl(max_tokens=100_000), 400, BR, "max_tokens",
         path=COMPL, message=(str(MAX_MODEL_LEN),)),
    Case("prompt_too_long_chat", chat(messages=[{"role": "user", "content": LONG_TEXT}]), 400,
         BR, "input_tokens", message=(str(MAX_MODEL_LEN), "context length")),
    Case("prompt_too_long_compl", compl(prompt=LONG_TEXT), 400, BR, "input_tokens", path=COMPL,
         message=(str(MAX_MODEL_LEN), "context length")),
    Case("prompt_too_long_tokens", compl(prompt=[1] * 9000), 400, BR, "input_tokens",
         path=COMPL, message=(str(MAX_MODEL_LEN), "context length")),
    Case("prompt_too_long_stream", chat(messages=[{"role": "user", "content": LONG_TEXT}],
                                        stream=True), 400, BR, "input_tokens",
         message=(str(MAX_MODEL_LEN), "context length")),
    Case("prompt_too_long_specpc", chat(messages=[{"role": "user", "content": LONG_TEXT}],
                                        approx={"method": "specpc", "prompt_budget": 1024}),
         400, BR, "input_tokens", message=(str(MAX_MODEL_LEN), "context length")),
    Case("prompt_too_long_speckv", compl(prompt=LONG_TEXT, approx={"method": "speckv"}), 400,
         BR, "input_tokens", path=COMPL, message=(str(MAX_MODEL_LEN), "context length")),
    Case("n_zero", compl(n=0), 400, BR, "n", path=COMPL),
    Case("n_negative", compl(n=-1), 400, BR, "n", path=COMPL),
    Case("n_huge", compl(n=100_000, temperature=1.0), 400, BR, "n", path=COMPL),
    # --- sampling parameters out of range
    Case("stop_number", chat(stop=42), 400, BRV, "body.stop"),
    Case("stop_list_of_numbers", chat(stop=[1, 2]), 400, BRV, "body.stop"),
    Case("temperature_negative", chat(temperature=-1), 400, BR, "temperature"),
    Case("top_p_zero", chat(top_p=0), 400, BR, "top_p"),
    Case("top_p_above_one", chat(top_p=1.5), 400, BR, "top_p"),
    Case("top_k_negative", chat(top_k=-5), 400, BR, "top_k"),
    Case("presence_penalty_high", chat(presence_penalty=3), 400, BR, "presence_penalty"),
    Case("frequency_penalty_low", chat(frequency_penalty=-3), 400, BR, "frequency_penalty"),
    Case("top_logprobs_without_logprobs", chat(top_logprobs=2), 400, BR, "top_logprobs"),
    Case("top_logprobs_negative", chat(logprobs=True, top_logprobs=-2), 400, BR,
         "top_logprobs"),
    Case("top_logprobs_too_many", chat(logprobs=True, top_logprobs=100), 400, BR, "logprobs",
         message=("20",)),
    Case("logprobs_too_many_compl", compl(logprobs=100), 400, BR, "logprobs", path=COMPL,
         message=("20",)),
    Case("logprobs_negative_compl", compl(logprobs=-2), 400, BR, "logprobs", path=COMPL),
    Case("stream_options_without_stream", chat(stream_options={"include_usage": True}), 400,
         BR, "stream_options"),
    # --- model
    Case("unknown_model_chat", chat(model="no-such-model"), 404, "NotFoundError", "model",
         message=("no-such-model",)),
    Case("unknown_model_compl", compl(model="no-such-model"), 404, "NotFoundError", "model",
         path=COMPL, message=("no-such-model",)),
    # --- approx
    Case("approx_unknown_method", chat(approx={"method": "bogus"}), 400, BR, "approx.method",
         message=("bogus",)),
    Case("approx_method_number", chat(approx={"method": 5}), 400, BR, "approx.method"),
    Case("approx_not_object_string", chat(approx="speckv"), 400, BR, "approx"),
    Case("approx_not_object_list", chat(approx=["speckv"]), 400, BR, "approx"),
    Case("approx_kv_budget_zero", chat(approx={"method": "speckv", "kv_budget": 0}), 400, BR,
         "approx.kv_budget"),
    Case("approx_kv_budget_negative", chat(approx={"method": "snapkv", "kv_budget": -5}), 400,
         BR, "approx.kv_budget"),
    Case("approx_kv_budget_string", chat(approx={"method": "speckv", "kv_budget": "abc"}), 400,
         BR, "approx.kv_budget"),
    Case("approx_kv_budget_float", chat(approx={"method": "speckv", "kv_budget": 2.5}), 400,
         BR, "approx.kv_budget"),
    Case("approx_prompt_budget_zero", chat(approx={"method": "specpc", "prompt_budget": 0}),
         400, BR, "approx.prompt_budget"),
    Case("approx_window_above_budget",
         chat(approx={"method": "speckv", "kv_budget": 64, "window": 128}), 400, BR,
         "approx.kv_budget", message=("window",)),
    Case("approx_window_negative", chat(approx={"method": "speckv", "window": -1}), 400, BR,
         "approx.window"),
    Case("approx_sink_above_budget",
         chat(approx={"method": "streamingllm", "kv_budget": 8, "sink_tokens": 16}), 400, BR,
         "approx.kv_budget"),
    Case("approx_unknown_key", chat(approx={"method": "speckv", "kv_budgett": 64}), 400, BR,
         "approx.kv_budgett"),
    Case("approx_key_of_other_method", chat(approx={"method": "none", "kv_budget": 64}), 400,
         BR, "approx.kv_budget"),
    Case("approx_weighted_query_string",
         chat(approx={"method": "specpc", "weighted_query": "maybe"}), 400, BR,
         "approx.weighted_query"),
    Case("approx_snapkv_lookahead", chat(approx={"method": "snapkv", "lookahead": 5}), 400, BR,
         "approx.lookahead"),
    Case("approx_start_layer_too_deep", chat(approx={"method": "specpc", "start_layer": 100}),
         400, BR, "approx.start_layer"),
    Case("approx_speckv_prompt_logprobs",
         compl(prompt=LONG_TEXT[:3000], prompt_logprobs=1,
               approx={"method": "speckv", "kv_budget": 64}), 400, BR, "prompt_logprobs",
         path=COMPL),
    Case("xargs_unknown_method", chat(vllm_xargs={"approx_method": "bogus"}), 400, BR,
         "approx.method"),
    Case("xargs_method_number", compl(vllm_xargs={"approx_method": 5}), 400, BR,
         "approx.method", path=COMPL),
    Case("xargs_kv_budget_string",
         chat(vllm_xargs={"approx_method": "speckv", "approx_kv_budget": "abc"}), 400, BR,
         "approx.kv_budget"),
    Case("xargs_kv_budget_zero",
         chat(vllm_xargs={"approx_method": "speckv", "approx_kv_budget": 0}), 400, BR,
         "approx.kv_budget"),
    Case("xargs_not_object", chat(vllm_xargs="approx_method=speckv"), 400, BRV,
         "body.vllm_xargs"),
    # --- body size
    Case("body_too_large_chat",
         b'{"model":"' + MODEL.encode() + b'","messages":[{"role":"user","content":"'
         + b"a" * (MAX_BODY_BYTES + 1024) + b'"}]}', 413, "RequestEntityTooLarge", None,
         message=(str(MAX_BODY_BYTES),)),
    Case("body_too_large_compl",
         b'{"prompt":"' + b"a" * (MAX_BODY_BYTES + 1) + b'"}', 413, "RequestEntityTooLarge",
         None, path=COMPL),
    # --- token ids the model does not have (last: these reach the engines)
    Case("token_id_out_of_vocab", compl(prompt=[1, 2, 10_000_000]), 400, BR, None, path=COMPL,
         message=("out of vocabulary",)),
    Case("token_id_negative", compl(prompt=[1, -5]), 400, BRV, "body.prompt.1", path=COMPL,
         message=("greater than or equal to 0",)),
    # a prompt over budget, so that the draft engine sees the bad id first
    Case("token_id_out_of_vocab_speckv",
         compl(prompt=[1] * 100 + [10_000_000],
               approx={"method": "speckv", "kv_budget": 32, "window": 8}), 400, BR, None,
         path=COMPL, message=("out of vocabulary",)),
    Case("token_id_out_of_vocab_specpc",
         compl(prompt=[1] * 100 + [10_000_000],
               approx={"method": "specpc", "prompt_budget": 32, "window": 8}), 400, BR, None,
         path=COMPL, message=("out of vocabulary",)),
]

# Inputs vLLM's OpenAI server tolerates (see the module docstring): 200, as documented.
ACCEPTED: list[Case] = [
    Case("unknown_top_level_field", chat(frobnicate=1, another_unknown={"a": 1}), 200, ""),
    Case("missing_model", without(chat(), "model"), 200, ""),
    # an assistant turn that only calls a tool needs no content (OpenAI's rule too)
    Case("assistant_tool_call_without_content", chat(messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]), 200, ""),
    # pydantic's lax mode: "yes" is a boolean
    Case("logprobs_yes_string", chat(logprobs="yes"), 200, ""),
    Case("approx_budget_beyond_context",
         chat(approx={"method": "speckv", "kv_budget": 2 * MAX_MODEL_LEN}), 200, ""),
]


def send(base_url: str, case: Case) -> httpx.Response:
    return httpx.post(base_url + case.path, content=case.content(), headers=case.headers,
                      timeout=600)


def check_error(case: Case, r: httpx.Response) -> dict[str, Any]:
    """The assertions every error case shares; returns the ``error`` object."""
    text = r.text
    assert "Traceback" not in text and 'File "' not in text, text[:2000]
    assert r.status_code == case.status, (case.id, r.status_code, text[:1000])
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["code"] == r.status_code, err
    if case.type is not ANY:
        assert err["type"] == case.type, (case.id, err)
    if case.param is not ANY:
        assert err["param"] == case.param, (case.id, err)
    for word in case.message:
        assert word.lower() in err["message"].lower(), (case.id, word, err["message"][:500])
    return err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_openai_error(server, case: Case) -> None:
    check_error(case, send(server.base_url, case))


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.id for c in ACCEPTED])
def test_tolerated_input_is_served(server, case: Case) -> None:
    r = send(server.base_url, case)
    assert r.status_code == 200, (case.id, r.text[:1000])
    assert r.json()["choices"], r.text[:1000]


@pytest.mark.parametrize("path", [CHAT, COMPL])
def test_non_post_method_gets_openai_405(server, path: str) -> None:
    case = Case("get", b"", 405, "MethodNotAllowed", None, path=path)
    check_error(case, httpx.get(server.base_url + path, timeout=60))


@pytest.mark.parametrize("path", ["/v1/nope", "/v1/chat/completion", "/v2/models"])
def test_unknown_route_gets_openai_404(server, path: str) -> None:
    case = Case("unknown-route", b"", 404, "NotFoundError", None, path=path)
    check_error(case, httpx.get(server.base_url + path, timeout=60))


def test_server_still_serves_after_the_battery(server) -> None:
    assert httpx.get(server.base_url + "/health", timeout=60).status_code == 200
    r = httpx.post(server.base_url + CHAT, json=chat(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8), timeout=600)
    assert r.status_code == 200, r.text[:1000]
    body = r.json()
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["approx"]["method"] == "none"

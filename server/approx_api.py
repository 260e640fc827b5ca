"""The ``approx`` extension of the OpenAI request and response (API.md), as ASGI middleware.

Why middleware and not our own copy of the protocol models: vLLM's OpenAI serving code stays
the single owner of the chat/completions protocol, and this layer only (1) takes the ``approx``
object (or flat ``vllm_xargs`` keys ``approx_*``) out of the body, validates it into an
``ApproxConfig`` and publishes it to the engine client through a context variable, and (2)
adds ``usage.approx`` to the JSON response or to the streamed chunk that carries ``usage``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Collection
from http import HTTPStatus
from typing import Any

from pydantic import ValidationError

from server.engine_client import CURRENT_REQUEST, RequestApprox
from server.messages import MessageError, check_messages
from specapprox_vllm.frontend.scheduler import ApproxStats, DraftScheduler
from specapprox_vllm.policies import make_approx_config

CHAT_PATH = "/v1/chat/completions"
APPROX_PATHS = (CHAT_PATH, "/v1/completions")
XARGS_PREFIX = "approx_"
# Left in the ASGI scope for outer observers (server/metrics.py): the method a request asked
# for ("invalid" when its approx settings were rejected), and its RequestApprox.
METHOD_SCOPE_KEY = "specapprox.method"
APPROX_SCOPE_KEY = "specapprox.approx"

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ApproxRequestError(ValueError):
    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def error_body(message: str, status: int, err_type: str = "BadRequestError",
               param: str | None = None) -> bytes:
    """OpenAI error shape, as vLLM's server writes it."""
    return json.dumps({"error": {"message": message, "type": err_type, "param": param,
                                 "code": status}}).encode()


async def send_error(send: Send, status: int, message: str, err_type: str = "BadRequestError",
                     param: str | None = None, headers: list | None = None) -> None:
    body = error_body(message, status, err_type, param)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def parse_approx(body: dict[str, Any], default_method: str,
                 method_defaults: dict[str, dict[str, Any]]) -> Any:
    """Validated settings from ``approx`` and ``vllm_xargs.approx_*`` (``approx`` wins).

    Removes both from ``body`` so that vLLM's own models never see them."""
    approx = body.pop("approx", None)
    if approx is None:
        approx = {}
    if not isinstance(approx, dict):
        raise ApproxRequestError("'approx' must be an object", "approx")
    flat: dict[str, Any] = {}
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict):
        for key in [k for k in xargs if k.startswith(XARGS_PREFIX)]:
            flat[key[len(XARGS_PREFIX):]] = xargs.pop(key)
        if not xargs:
            body.pop("vllm_xargs")
    merged = {**flat, **approx}
    method = merged.get("method", default_method)
    if not isinstance(method, str):
        raise ApproxRequestError("approx.method must be a string", "approx.method")
    try:
        return make_approx_config(method, merged, method_defaults.get(method))
    except ValidationError as e:
        first = e.errors()[0]
        msg = first["msg"].removeprefix("Value error, ")
        loc = ".".join(str(p) for p in first["loc"])
        if not loc:  # a cross-field check: its message starts with the field it is about
            word = msg.split(" ", 1)[0]
            loc = word if word in merged or word in method_defaults.get(method, {}) else ""
        param = f"approx.{loc}" if loc else "approx"
        raise ApproxRequestError(f"{param}: {msg}", param) from None
    except ValueError as e:
        raise field_error(e) from None


def field_error(e: ValueError) -> ApproxRequestError:
    """An error whose message reads ``"<field>: <message>"`` (the configs' and the
    scheduler's convention), as a 400 naming ``approx.<field>``; ``method`` otherwise."""
    field = str(e).split(":", 1)[0] if ":" in str(e) else "method"
    if " " in field:
        field = "method"
    return ApproxRequestError(f"approx.{e}", f"approx.{field}")


def approx_usage(stats: list[ApproxStats]) -> dict[str, Any] | None:
    """One ``usage.approx`` object for all engine requests of an HTTP request (a completions
    request may carry several prompts): counts and times add up."""
    if not stats:
        return None
    out = stats[0].to_dict()
    for s in stats[1:]:
        out["applied"] = out["applied"] or s.applied
        for key in ("prompt_tokens_in", "prompt_tokens_kept", "draft_tokens"):
            out[key] += getattr(s, key)
        for key in ("draft_ms", "select_ms"):
            out[key] = round(out[key] + getattr(s, key), 3)
    return out


def _inject(obj: Any, approx: dict[str, Any] | None) -> bool:
    if approx is None or not isinstance(obj, dict) or not isinstance(obj.get("usage"), dict):
        return False
    obj["usage"]["approx"] = approx
    return True


class ApproxMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streaming responses)."""

    def __init__(self, app: Any, scheduler: DraftScheduler, default_method: str,
                 method_defaults: dict[str, dict[str, Any]], max_body_bytes: int) -> None:
        self.app = app
        self.scheduler = scheduler
        self.default_method = default_method
        self.method_defaults = method_defaults
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in APPROX_PATHS:
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("POST", "OPTIONS"):  # OPTIONS: vLLM's CORS preflight
            # Starlette's router answers {"detail": "Method Not Allowed"}, not OpenAI's shape.
            await send_error(send, HTTPStatus.METHOD_NOT_ALLOWED,
                             f"{scope['method']} is not allowed on {scope['path']}; use POST",
                             "MethodNotAllowed", headers=[(b"allow", b"POST")])
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope[METHOD_SCOPE_KEY] = "invalid"
        raw = await self._read_body(receive)
        if raw is None:
            await send_error(send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"request body exceeds {self.max_body_bytes} bytes",
                             "RequestEntityTooLarge")
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            body = None  # vLLM answers malformed JSON itself, in OpenAI's shape
        except (ValueError, RecursionError) as e:
            # Not UTF-8 (UnicodeDecodeError), an integer literal over Python's 4300-digit
            # limit (ValueError) or nesting deeper than the recursion limit: uncaught, these
            # were a bare 500; handed to vLLM, FastAPI answers {"detail": ...}, not OpenAI's
            # shape. Neither is the client's fault to debug, so say what is wrong.
            await send_error(send, HTTPStatus.BAD_REQUEST,
                             f"request body is not valid JSON: {_parse_failure(e)}")
            return
        ctx = None
        if isinstance(body, dict):
            if scope["path"] == CHAT_PATH:
                try:
                    check_messages(body)
                except MessageError as e:
                    await send_error(send, HTTPStatus.BAD_REQUEST, str(e), param=e.param)
                    return
            try:
                cfg = parse_approx(body, self.default_method, self.method_defaults)
                scope[METHOD_SCOPE_KEY] = cfg.method
                self.scheduler.check(cfg)
            except (ApproxRequestError, ValueError) as e:
                err = e if isinstance(e, ApproxRequestError) else field_error(e)
                await send_error(send, HTTPStatus.BAD_REQUEST, str(err), param=err.param)
                return
            ctx = RequestApprox(cfg)
            scope[APPROX_SCOPE_KEY] = ctx
            raw = json.dumps(body, separators=(",", ":")).encode()
        token = CURRENT_REQUEST.set(ctx)
        try:
            await self.app(scope, _replay(raw, receive),
                           _UsageSender(send, ctx, fields=body) if ctx else send)
        finally:
            CURRENT_REQUEST.reset(token)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        return b"".join(chunks)


def _parse_failure(e: BaseException) -> str:
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(";", 1)[0]  # "Exceeds the limit (4300 digits) for integer string ..."


# "n must be at least 1, got 0.", "`top_k` must be ...": the field a message is about.
_MESSAGE_FIELD = re.compile(r"`?([A-Za-z_]\w*)`? must\b")


def fill_param(body: bytes, fields: Collection[str]) -> bytes:
    """An error body whose ``param`` is null gets the field its message starts with, when that
    is a top-level field of the request.

    Why: vLLM's sampling-parameter checks for ``n``, ``top_k``, ``presence_penalty`` and
    ``frequency_penalty`` (vllm/sampling_params.py) raise without a ``parameter``, so their 400
    said ``"param": null`` although the message names the field (``"n must be at least 1, got
    0."``). Anything else passes through unchanged."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict) or err.get("param") is not None or \
            not isinstance(err.get("message"), str):
        return body
    m = _MESSAGE_FIELD.match(err["message"])
    if m is None or m.group(1) not in fields:
        return body
    err["param"] = m.group(1)
    return json.dumps(obj).encode()


def _replay(raw: bytes, receive: Receive) -> Receive:
    """Hand the (rewritten) body to the app once, then the client's own messages, so that
    vLLM's disconnect watcher sees a real disconnect, not an invented one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replay


class _UsageSender:
    """Rewrites the response: JSON bodies are buffered (they are small) and SSE events are
    rewritten one by one; only the object that carries ``usage`` changes, and a JSON error
    (4xx, 5xx) whose ``param`` is missing (:func:`fill_param`; ``fields``: the request's
    top-level keys)."""

    def __init__(self, send: Send, ctx: RequestApprox, fields: Collection[str] = ()) -> None:
        self.send = send
        self.ctx = ctx
        self.fields = fields
        self.start: Message | None = None
        self.kind = "other"
        self.buf = b""

    async def __call__(self, msg: Message) -> None:
        if msg["type"] == "http.response.start":
            headers = dict(msg.get("headers", []))
            ctype = headers.get(b"content-type", b"").decode()
            if msg["status"] == 200 and ctype.startswith("application/json"):
                self.kind, self.start = "json", msg
                return
            if msg["status"] >= 400 and ctype.startswith("application/json"):
                self.kind, self.start = "error", msg
                return
            if ctype.startswith("text/event-stream"):
                self.kind = "sse"
            await self.send(msg)
            return
        if msg["type"] != "http.response.body":
            await self.send(msg)
            return
        if self.kind in ("json", "error"):
            self.buf += msg.get("body", b"")
            if msg.get("more_body"):
                return
            await self._flush_json()
        elif self.kind == "sse":
            await self._forward_sse(msg)
        else:
            await self.send(msg)

    async def _flush_json(self) -> None:
        body = self.buf
        if self.kind == "error":
            body = fill_param(body, self.fields)
        else:
            try:
                obj = json.loads(body)
                if _inject(obj, approx_usage(self.ctx.stats)):
                    body = json.dumps(obj, separators=(",", ":")).encode()
            except json.JSONDecodeError:
                pass
        assert self.start is not None
        headers = [(k, v) for k, v in self.start.get("headers", []) if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def _forward_sse(self, msg: Message) -> None:
        self.buf += msg.get("body", b"")
        more = msg.get("more_body", False)
        events, sep, rest = self.buf.rpartition(b"\n\n")
        if not sep and more:
            return
        if not sep:
            events, rest = self.buf, b""
        self.buf = rest
        out = []
        for event in (events + sep).split(b"\n\n"):
            if event.startswith(b"data: {") and b'"usage"' in event:
                try:
                    obj = json.loads(event[6:])
                    if _inject(obj, approx_usage(self.ctx.stats)):
                        event = b"data: " + json.dumps(obj, separators=(",", ":")).encode()
                except json.JSONDecodeError:
                    pass
            out.append(event)
        await self.send({"type": "http.response.body", "body": b"\n\n".join(out),
                         "more_body": more})

"""The server's edge and the draft-failure policy, without engines: admission (429 with
Retry-After, bounded queue), deadlines (504, abort seen by the app as a disconnect, SSE tail),
fail-fast on a dead engine, request ids, the 500 guard, bearer auth on every route but
/health, and ``on_draft_failure`` with a draft that raises or hangs.

The fake apps behave like vLLM's handlers where it matters: they wait for ``http.disconnect``
on ``receive`` to abort (``with_cancellation``, Starlette's streaming listener).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from server.app import BearerAuthMiddleware
from server.guard import Admission, AdmissionMiddleware, RequestContextMiddleware

PATH = "/v1/chat/completions"


class FakeClient:
    errored = False


class Recorder:
    """One request's ASGI conversation: what the app got and what the client received."""

    def __init__(self, body: bytes = b"{}", path: str = PATH, method: str = "POST",
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.scope: dict[str, Any] = {"type": "http", "method": method, "path": path,
                                      "headers": headers or []}
        self.body = body
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()  # set to simulate a client disconnect

    async def receive(self) -> dict[str, Any]:
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.sent if m["type"] == "http.response.start"),
                    None)

    @property
    def headers(self) -> dict[bytes, bytes]:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return dict(start["headers"])

    @property
    def text(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent
                        if m["type"] == "http.response.body")

    def json(self) -> dict[str, Any]:
        return json.loads(self.text)


class SlowApp:
    """Reads the body, then 'generates' for ``seconds`` unless the client disconnects
    (``aborted`` is then set, as vLLM aborts its engine requests)."""

    def __init__(self, seconds: float, stream: bool = False) -> None:
        self.seconds = seconds
        self.stream = stream
        self.aborted = 0
        self.finished = 0
        self.running = 0
        self.peak = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await receive()
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if self.stream:
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/event-stream")]})
                await send({"type": "http.response.body", "body": b"data: {}\n\n",
                            "more_body": True})
            work = asyncio.ensure_future(asyncio.sleep(self.seconds))
            gone = asyncio.ensure_future(receive())
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone in done and gone.result()["type"] == "http.disconnect":
                work.cancel()
                self.aborted += 1
                return
            gone.cancel()
            self.finished += 1
            if self.stream:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            else:
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": b'{"ok": true}'})
        finally:
            self.running -= 1


async def test_burst_beyond_the_queue_gets_429_with_retry_after() -> None:
    app = SlowApp(0.3)
    adm = Admission(max_active=2, max_queued=3, timeout_s=None)
    mw = AdmissionMiddleware(app, adm, FakeClient())
    reqs = [Recorder() for _ in range(12)]
    await asyncio.gather(*[mw(r.scope, r.receive, r.send) for r in reqs])
    statuses = sorted(r.status for r in reqs)
    assert statuses == [200] * 5 + [429] * 7  # 2 served + 3 queued, the rest refused
    assert app.peak == 2 and app.finished == 5
    for r in reqs:
        if r.status == 429:
            assert int(r.headers[b"retry-after"]) >= 1
            assert r.json()["error"]["type"] == "RateLimitError"
            assert r.json()["error"]["code"] == 429
    assert adm.rejected == 7 and adm.active == 0 and adm.queued == 0


async def test_deadline_aborts_the_app_and_answers_504() -> None:
    app = SlowApp(30)
    adm = Admission(max_active=4, max_queued=4, timeout_s=0.3)
    r = Recorder()
    await asyncio.wait_for(AdmissionMiddleware(app, adm, FakeClient())(
        r.scope, r.receive, r.send), 5)
    assert r.status == 504
    assert r.json()["error"]["type"] == "TimeoutError"
    assert "request_timeout_s" in r.json()["error"]["message"]
    assert app.aborted == 1 and app.finished == 0  # the work was aborted, not left running
    assert adm.timed_out == 1 and adm.active == 0


async def test_deadline_mid_stream_ends_with_one_sse_error_event() -> None:
    app = SlowApp(30, stream=True)
    adm = Admission(max_active=4, max_queued=4, timeout_s=0.3)
    r = Recorder()
    await asyncio.wait_for(AdmissionMiddleware(app, adm, FakeClient())(
        r.scope, r.receive, r.send), 5)
    assert r.status == 200 and app.aborted == 1
    events = [e for e in r.text.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    err = json.loads(events[-2].removeprefix(b"data: "))
    assert err["error"]["code"] == 504
    assert r.sent[-1].get("more_body") is False


async def test_deadline_while_queued_is_504_and_frees_the_place() -> None:
    app = SlowApp(1.0)
    adm = Admission(max_active=1, max_queued=4, timeout_s=0.3)
    mw = AdmissionMiddleware(app, adm, FakeClient())
    first, second = Recorder(), Recorder()
    await asyncio.gather(mw(first.scope, first.receive, first.send),
                         mw(second.scope, second.receive, second.send))
    assert {first.status, second.status} == {504}  # first by deadline, second in the queue
    assert b"admission queue" in second.text or b"admission queue" in first.text
    assert adm.queued == 0 and adm.active == 0


async def test_client_disconnect_reaches_the_app() -> None:
    app = SlowApp(30)
    adm = Admission(max_active=4, max_queued=4, timeout_s=60)
    r = Recorder()
    task = asyncio.ensure_future(AdmissionMiddleware(app, adm, FakeClient())(
        r.scope, r.receive, r.send))
    await asyncio.sleep(0.1)
    r.gone.set()
    await asyncio.wait_for(task, 2)
    assert app.aborted == 1 and adm.active == 0


class AbortingClient(FakeClient):
    def __init__(self) -> None:
        self.aborted: list[list[str]] = []

    async def abort_requests(self, request_ids: list[str]) -> None:
        self.aborted.append(list(request_ids))


class LeakyStreamApp:
    """Streams like Starlette's StreamingResponse over vLLM's generator: when a send fails
    it lets the error out and never closes its engine request (that is left to the garbage
    collector, which is how a timed-out stream once ran on in the engine)."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from types import SimpleNamespace

        from server.approx_api import APPROX_SCOPE_KEY

        await receive()
        scope[APPROX_SCOPE_KEY] = SimpleNamespace(engine_requests=["chatcmpl-1", "la-1"])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(self.chunks):
            await asyncio.sleep(0.05)
            await send({"type": "http.response.body", "body": b"data: {}\n\n",
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def test_deadline_aborts_the_engine_requests_of_a_leaked_stream() -> None:
    client = AbortingClient()
    r = Recorder()
    await asyncio.wait_for(AdmissionMiddleware(LeakyStreamApp(1000), Admission(4, 4, 0.3),
                                               client)(r.scope, r.receive, r.send), 5)
    assert client.aborted == [["chatcmpl-1", "la-1"]]
    assert r.text.endswith(b"data: [DONE]\n\n") and b"TimeoutError" in r.text


async def test_finished_response_aborts_nothing() -> None:
    client = AbortingClient()
    r = Recorder()
    await AdmissionMiddleware(LeakyStreamApp(2), Admission(4, 4, 30), client)(
        r.scope, r.receive, r.send)
    assert client.aborted == [] and r.text.endswith(b"data: [DONE]\n\n")


async def test_dead_engine_fails_fast_with_503() -> None:
    client = FakeClient()
    client.errored = True
    app = SlowApp(30)
    r = Recorder()
    await asyncio.wait_for(AdmissionMiddleware(app, Admission(4, 4, None), client)(
        r.scope, r.receive, r.send), 1)
    assert r.status == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
    assert app.running == 0 and app.finished == 0


async def test_other_routes_are_not_admitted_or_limited() -> None:
    app = SlowApp(0)
    adm = Admission(max_active=1, max_queued=0, timeout_s=0.01)
    r = Recorder(path="/v1/models", method="GET")
    await AdmissionMiddleware(app, adm, FakeClient())(r.scope, r.receive, r.send)
    assert r.status == 200 and adm.rejected == 0 and adm.timed_out == 0


async def test_request_id_is_kept_or_made_and_returned() -> None:
    seen: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(dict(scope["headers"])[b"x-request-id"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = RequestContextMiddleware(app)
    mine = Recorder(headers=[(b"x-request-id", b"client-id-42")])
    await mw(mine.scope, mine.receive, mine.send)
    assert seen[-1] == b"client-id-42" and mine.headers[b"x-request-id"] == b"client-id-42"
    bad = Recorder(headers=[(b"x-request-id", b"no spaces\nor newlines")])
    await mw(bad.scope, bad.receive, bad.send)
    assert seen[-1] != b"no spaces\nor newlines" and len(seen[-1]) == 32
    assert bad.headers[b"x-request-id"] == seen[-1]


async def test_unhandled_error_is_500_without_traceback(caplog) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("secret internal detail")

    r = Recorder(headers=[(b"x-request-id", b"rid-7")])
    with caplog.at_level("ERROR", logger="specapprox.requests"):
        await RequestContextMiddleware(app)(r.scope, r.receive, r.send)
    assert r.status == 500
    err = r.json()["error"]
    assert err["type"] == "InternalServerError" and "rid-7" in err["message"]
    assert b"Traceback" not in r.text and b"secret internal detail" not in r.text
    assert "secret internal detail" in caplog.text  # the operator still gets it


@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions", "/metrics",
                                  "/specapprox/state", "/tokenize", "/version"])
async def test_bearer_auth_guards_every_route_but_health(path: str) -> None:
    app = SlowApp(0)
    mw = BearerAuthMiddleware(app, api_key="k3y")
    r = Recorder(path=path, method="GET")
    await mw(r.scope, r.receive, r.send)
    assert r.status == 401 and r.json()["error"]["code"] == 401
    ok = Recorder(path=path, method="GET", headers=[(b"authorization", b"Bearer k3y")])
    await mw(ok.scope, ok.receive, ok.send)
    assert ok.status == 200
    health = Recorder(path="/health", method="GET")
    await mw(health.scope, health.receive, health.send)
    assert health.status == 200


class FakeDraftEngine:
    """A draft ``AsyncLLM`` stand-in that fails (``mode="raise"``) or never answers
    (``mode="hang"``, recording the cancellation that aborts the request in vLLM)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.cancelled = 0
        self.popped: list[str] = []

    async def generate(self, prompt: Any, params: Any, request_id: str):
        if self.mode == "raise":
            raise RuntimeError("draft engine exploded")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        yield None  # pragma: no cover - never reached

    async def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        self.popped.extend(args[0])
        return [{}]


def _plan_with(mode: str, policy: str, method: str = "specpc"):
    from specapprox_vllm.frontend.draft_runner import DraftRunner
    from specapprox_vllm.frontend.pipeline import MethodPipeline
    from specapprox_vllm.frontend.scheduler import DraftScheduler
    from specapprox_vllm.policies import load_method_defaults, make_approx_config

    engine = FakeDraftEngine(mode)
    pipeline = MethodPipeline(None, DraftRunner(engine, timeout_s=0.2))  # no target needed
    scheduler = DraftScheduler(pipeline, on_draft_failure=policy)
    defaults = load_method_defaults("configs/methods")
    cfg = make_approx_config(method, {"prompt_budget": 64, "window": 8, "neighbors": 4,
                                      "kernel": 3}, defaults.get(method))
    return engine, scheduler, scheduler.plan(list(range(200)), None, cfg, "req-1")


@pytest.mark.parametrize(("mode", "kind"), [("raise", "draft_error"),
                                            ("hang", "draft_timeout")])
async def test_draft_failure_falls_back_to_full_attention(mode: str, kind: str) -> None:
    engine, scheduler, planning = _plan_with(mode, "fallback")
    plan = await asyncio.wait_for(planning, 5)
    assert plan.prompt_token_ids == list(range(200))  # the whole prompt: full attention
    usage = plan.stats.to_dict()
    assert usage["applied"] is False and usage["fallback"] == kind
    assert usage["reason"] == "draft_failed" and scheduler.draft_failures == 1
    if mode == "hang":
        assert engine.cancelled == 1  # the draft request was aborted, not left running
        assert engine.popped  # and whatever it captured was dropped


@pytest.mark.parametrize("mode", ["raise", "hang"])
async def test_draft_failure_policy_error_is_a_retryable_503(mode: str) -> None:
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import RetryableRequestError

    _, _, planning = _plan_with(mode, "error")
    with pytest.raises(RetryableRequestError) as e:
        await asyncio.wait_for(planning, 5)
    err = create_error_response(e.value).error  # what vLLM's server answers
    assert err.code == 503 and err.type == "ServiceUnavailableError"
    assert "draft" in err.message


def test_unknown_draft_failure_policy_is_refused() -> None:
    from specapprox_vllm.frontend.scheduler import DraftScheduler

    with pytest.raises(ValueError, match="on_draft_failure"):
        DraftScheduler(None, on_draft_failure="ignore")


async def test_starlette_errors_are_rewritten_into_openai_shape() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b'{"detail":"Not Found"}' if scope["path"] == "/nope" else b'{"error": 1}'
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    r = Recorder(path="/nope", method="GET")
    await RequestContextMiddleware(app)(r.scope, r.receive, r.send)
    err = r.json()["error"]
    assert r.status == 404 and err == {"message": "Not Found", "type": "NotFoundError",
                                       "param": None, "code": 404}
    assert int(r.headers[b"content-length"]) == len(r.text)
    other = Recorder(path="/v1/models", method="GET")
    await RequestContextMiddleware(app)(other.scope, other.receive, other.send)
    assert other.text == b'{"error": 1}'  # anything else passes through unchanged

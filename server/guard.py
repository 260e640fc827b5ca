"""The server's edge: request ids and one log line per request, a last-resort error guard, and
admission control.

Why here and not in vLLM's app: these decide whether a request reaches the engines at all and
how it ends, so they must see every request before the draft does any work.

* :class:`RequestContextMiddleware` gives each request an id (the client's ``X-Request-Id``
  when it is sane, else a new one), passes it to vLLM (which names its engine requests after
  it) and back in the response header, and logs one line per request: id, route, status,
  duration and approx method; never the prompt. An exception that escapes the app becomes an
  OpenAI-shaped 500 that names the request id; the traceback goes to the log, not the body.
  Starlette's own ``{"detail": ...}`` errors (unknown route, wrong method) are rewritten into
  OpenAI's error shape.
* :class:`AdmissionMiddleware` bounds the work in the server: at most ``max_active`` completion
  requests are served at once and ``max_queued`` wait for a slot; beyond that the answer is 429
  with ``Retry-After``. Each request has a deadline (queueing included). When an engine has
  died, requests are refused at once with 503 instead of hanging.

The deadline is enforced as a *disconnect*: vLLM's handlers already abort their engine requests
when the client goes away (``with_cancellation``, Starlette's streaming disconnect listener),
so at the deadline the app is told the client left, its further output is discarded, and the
client gets a 504 (or, mid-stream, a final SSE error event). Cancelling the app's task from
outside would not reach vLLM's handler task and would leave the engines generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from http import HTTPStatus
from typing import Any

from server.approx_api import (
    APPROX_PATHS,
    APPROX_SCOPE_KEY,
    METHOD_SCOPE_KEY,
    Message,
    Receive,
    Scope,
    Send,
    error_body,
    send_error,
)

log = logging.getLogger("specapprox.requests")
REQUEST_ID_SCOPE_KEY = "specapprox.request_id"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
QUIET_PATHS = ("/health", "/metrics")  # polled constantly; not worth a log line each
GRACE_S = 5.0  # after the deadline, how long the app may take to unwind before it is cancelled


class RequestContextMiddleware:
    """Request id, one log line per request, and the last-resort 500 guard."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope.get("headers", []) if k != b"x-request-id"]
        given = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex
        # in place: outer layers (metrics) read what inner ones leave in the scope
        scope["headers"] = [*headers, (b"x-request-id", rid.encode())]
        scope[REQUEST_ID_SCOPE_KEY] = rid
        status: list[int] = []
        held: list[Message] = []  # a Starlette error's start, until its body is seen

        async def send_with_id(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status.append(msg["status"])
                msg = {**msg, "headers": [*msg.get("headers", []),
                                          (b"x-request-id", rid.encode())]}
                if msg["status"] >= 400:
                    held.append(msg)
                    return
            elif held and msg["type"] == "http.response.body":
                start, msg = _openai_error(held.pop(), msg)
                await send(start)
            await send(msg)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - the guard of last resort
            log.exception("request %s %s %s failed", rid, scope.get("method"), scope["path"])
            if not status:
                await send_error(send_with_id, HTTPStatus.INTERNAL_SERVER_ERROR,
                                 f"internal server error (request id {rid})",
                                 "InternalServerError")
        finally:
            if scope["path"] not in QUIET_PATHS:
                log.info("request %s %s %s -> %s in %.0f ms approx=%s", rid,
                         scope.get("method"), scope["path"], status[0] if status else "-",
                         1e3 * (time.perf_counter() - t0), scope.get(METHOD_SCOPE_KEY, "-"))


def _openai_error(start: Message, body: Message) -> tuple[Message, Message]:
    """An error response as (start, body), rewritten into OpenAI's shape when it is
    Starlette's ``{"detail": "..."}`` (unknown route, wrong method); unchanged otherwise."""
    raw = body.get("body", b"")
    if body.get("more_body") or not raw.startswith(b'{"detail":'):
        return start, body
    try:
        detail = json.loads(raw)["detail"]
    except (ValueError, KeyError):
        return start, body
    if not isinstance(detail, str):
        return start, body
    err_type = HTTPStatus(start["status"]).phrase.replace(" ", "") + "Error"
    new = error_body(detail, start["status"], err_type)
    headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
    return ({**start, "headers": [*headers, (b"content-length", str(len(new)).encode())]},
            {**body, "body": new})


class Admission:
    """Slots, queue and counters (shared with ``/specapprox/state``)."""

    def __init__(self, max_active: int, max_queued: int, timeout_s: float | None) -> None:
        self.max_active = max_active
        self.max_queued = max_queued
        self.timeout_s = timeout_s
        self.active = 0
        self.queued = 0
        self.rejected = 0
        self.timed_out = 0
        self.completed = 0  # requests that held a slot and let it go
        self._sem: asyncio.Semaphore | None = None  # made in the serving event loop
        self._mean_s = 1.0  # moving average of a request's service time (for Retry-After)

    @property
    def sem(self) -> asyncio.Semaphore:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_active)
        return self._sem

    def full(self) -> bool:
        return self.sem.locked() and self.queued >= self.max_queued

    def retry_after(self) -> int:
        """Seconds until the queue ahead of a new request has likely drained (1..60)."""
        est = self._mean_s * (self.queued + 1) / self.max_active
        return max(1, min(60, math.ceil(est)))

    async def enter(self, timeout: float | None) -> None:
        """Wait in the queue for a slot (``TimeoutError`` after ``timeout``); the caller
        must call :meth:`done` once it holds one."""
        self.queued += 1
        try:
            await asyncio.wait_for(self.sem.acquire(), timeout)
        finally:
            self.queued -= 1
        self.active += 1

    def done(self, seconds: float) -> None:
        self.active -= 1
        self.completed += 1
        self.sem.release()
        self._mean_s = 0.9 * self._mean_s + 0.1 * seconds

    def to_dict(self) -> dict[str, int | float | None]:
        return {"active": self.active, "queued": self.queued, "max_active": self.max_active,
                "max_queued": self.max_queued, "rejected": self.rejected,
                "timed_out": self.timed_out, "completed": self.completed,
                "timeout_s": self.timeout_s}


class _Deadline:
    """The receive/send wrappers that turn a deadline into a client disconnect."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.hit = asyncio.Event()
        self.started = False  # response start sent
        self.finished = False  # last body message sent
        self.sse = False

    async def receive(self) -> Message:
        if self.hit.is_set():
            return {"type": "http.disconnect"}
        recv = asyncio.ensure_future(self._receive())
        hit = asyncio.ensure_future(self.hit.wait())
        try:
            done, _ = await asyncio.wait({recv, hit}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (recv, hit):
                if not fut.done():
                    fut.cancel()
        return recv.result() if recv in done else {"type": "http.disconnect"}

    async def send(self, msg: Message) -> None:
        if self.hit.is_set():
            raise OSError("request deadline passed")  # what a gone client looks like
        if msg["type"] == "http.response.start":
            self.started = True
            ctype = dict(msg.get("headers", [])).get(b"content-type", b"")
            self.sse = ctype.startswith(b"text/event-stream")
        elif msg["type"] == "http.response.body" and not msg.get("more_body"):
            self.finished = True
        await self._send(msg)

    async def answer_timeout(self, message: str) -> None:
        """The client's one terminal response after the deadline."""
        if not self.started:
            await send_error(self._send, HTTPStatus.GATEWAY_TIMEOUT, message, "TimeoutError")
        elif self.sse and not self.finished:
            event = b"data: " + error_body(message, HTTPStatus.GATEWAY_TIMEOUT, "TimeoutError")
            await self._send({"type": "http.response.body",
                              "body": event + b"\n\ndata: [DONE]\n\n", "more_body": False})


class AdmissionMiddleware:
    """Bounded admission, deadlines and fail-fast for the completion endpoints."""

    def __init__(self, app: Any, admission: Admission, engine_client: Any) -> None:
        self.app = app
        self.admission = admission
        self.client = engine_client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or \
                scope["path"] not in APPROX_PATHS:
            await self.app(scope, receive, send)
            return
        adm = self.admission
        if self.client.errored:
            await send_error(send, HTTPStatus.SERVICE_UNAVAILABLE, "an engine process has died; "
                             "this server cannot serve requests (see /health)",
                             "ServiceUnavailableError")
            return
        if adm.full():
            adm.rejected += 1
            wait = adm.retry_after()
            await send_error(send, HTTPStatus.TOO_MANY_REQUESTS,
                             f"server overloaded: {adm.active} requests in service and "
                             f"{adm.queued} queued (limits {adm.max_active}/{adm.max_queued}); "
                             f"retry after {wait} s", "RateLimitError",
                             headers=[(b"retry-after", str(wait).encode())])
            return
        t0 = time.monotonic()
        timeout = adm.timeout_s
        try:
            await adm.enter(timeout)
        except TimeoutError:
            adm.timed_out += 1
            await send_error(send, HTTPStatus.GATEWAY_TIMEOUT,
                             f"request waited in the admission queue longer than the server's "
                             f"request_timeout_s ({timeout} s)", "TimeoutError")
            return
        try:
            await self._serve(scope, receive, send, t0)
        finally:
            adm.done(time.monotonic() - t0)

    async def _abort_engine_requests(self, scope: Scope) -> None:
        """Abort the target requests of an HTTP request that ended without its full response
        (deadline, client gone), explicitly: see ``ApproxEngineClient.abort_requests``."""
        ctx = scope.get(APPROX_SCOPE_KEY)
        if ctx is not None and ctx.engine_requests:
            await self.client.abort_requests(ctx.engine_requests)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, t0: float) -> None:
        timeout = self.admission.timeout_s
        dl = _Deadline(receive, send)
        task = asyncio.ensure_future(self.app(scope, dl.receive, dl.send))
        try:
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - t0))
            done, _ = await asyncio.wait({task}, timeout=left)
            if task in done:
                try:
                    task.result()
                finally:
                    if not dl.finished:  # the client left mid-response: nothing may run on
                        await self._abort_engine_requests(scope)
                return
            dl.hit.set()  # the app's handlers now see a disconnect and abort their requests
            self.admission.timed_out += 1
            done, _ = await asyncio.wait({task}, timeout=GRACE_S)
            if not done:
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await self._abort_engine_requests(scope)
            await dl.answer_timeout(f"request exceeded the server's request_timeout_s "
                                    f"({timeout} s) and was aborted")
        except asyncio.CancelledError:
            task.cancel()
            raise

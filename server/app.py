"""Assembling the HTTP app: vLLM's OpenAI app around our engine client, plus our middleware.

Layers, outermost first: metrics -> request id, log line and 500 guard -> authentication
(OpenAI error shape, every route but ``/health``) -> admission (bounded queue, 429, deadline,
fail fast on a dead engine) -> ``approx`` request/response extension -> vLLM's FastAPI app
(chat, completions, models, health, metrics, tokenize ..., plus our ``/specapprox/state``),
whose ``engine_client`` is :class:`ApproxEngineClient`.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from server.approx_api import ApproxMiddleware, Receive, Scope, Send, send_error
from server.config import ServerConfig
from server.engine_client import ApproxEngineClient
from server.engines import self_draft
from server.guard import Admission, AdmissionMiddleware, RequestContextMiddleware
from server.memory_trim import MemoryTrimmer
from server.metrics import instrument
from server.state import collect_state
from specapprox_vllm.frontend.pipeline import build_scheduler
from specapprox_vllm.policies import load_method_defaults, load_policy_modules, make_approx_config
from specapprox_vllm.vllm_compat import build_openai_app

MAX_BODY_BYTES = 32 * 1024 * 1024
UNAUTHENTICATED_PATHS = ("/health",)


class BearerAuthMiddleware:
    """Bearer-token check with constant-time comparison, in OpenAI's error shape."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.digest = hashlib.sha256(api_key.encode()).digest()

    def _ok(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers", []))
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        given = hashlib.sha256(token.encode()).digest()
        return scheme.lower() == "bearer" and secrets.compare_digest(given, self.digest)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") != "OPTIONS" and \
                scope["path"] not in UNAUTHENTICATED_PATHS and not self._ok(scope):
            await send_error(send, 401, "invalid or missing API key", "AuthenticationError",
                             headers=[(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


@dataclass
class ServerApp:
    """What :func:`build_server_app` assembles: the ASGI app to serve, vLLM's FastAPI app
    inside it, the engine client and the admission state."""

    asgi: Any
    fastapi: Any
    client: ApproxEngineClient
    admission: Admission
    trimmer: MemoryTrimmer


def add_state_route(app: Any, client: ApproxEngineClient, admission: Admission,
                    trimmer: MemoryTrimmer) -> None:
    from fastapi.responses import JSONResponse

    async def specapprox_state(probe: bool = False) -> JSONResponse:
        return JSONResponse(await collect_state(client, admission, probe, trimmer))

    app.add_api_route("/specapprox/state", specapprox_state, methods=["GET"],
                      summary="engines' KV use, stored compacted KV, queue, memory")


async def build_server_app(
    cfg: ServerConfig, vllm_args: Any, target: Any, draft: Any | None = None
) -> ServerApp:
    """vLLM's FastAPI app wrapped in our middleware, around our engine client."""
    load_policy_modules(cfg.approx.policy_modules)
    load_policy_modules()  # and those of $SPECAPPROX_POLICY_MODULES, as the engines do
    method_defaults = load_method_defaults(cfg.approx.methods_dir)
    default_cfg = make_approx_config(cfg.approx.default_method, None,
                                     method_defaults.get(cfg.approx.default_method))
    scheduler = build_scheduler(target, draft, draft_timeout_s=cfg.approx.draft_timeout_s,
                                on_draft_failure=cfg.approx.on_draft_failure,
                                self_draft=self_draft(cfg))
    scheduler.check_supported(cfg.approx.default_method)
    client = ApproxEngineClient(target, scheduler, default_cfg, draft)

    supported_tasks = await target.get_supported_tasks()
    app = await build_openai_app(vllm_args, client, supported_tasks, target.model_config)
    app.state.specapprox_config = cfg
    admission = Admission(cfg.server.max_active_requests, cfg.server.max_queued_requests,
                          cfg.server.request_timeout_s)
    trimmer = MemoryTrimmer({"target": target, "draft": draft},
                            cfg.server.memory_trim_interval_s, admission)
    add_state_route(app, client, admission, trimmer)
    # vLLM's app has built its middleware stack by now, so ours wrap it from outside.
    asgi: Any = ApproxMiddleware(app, scheduler=scheduler,
                                 default_method=cfg.approx.default_method,
                                 method_defaults=method_defaults, max_body_bytes=MAX_BODY_BYTES)
    asgi = AdmissionMiddleware(asgi, admission, client)
    if cfg.server.api_key:
        asgi = BearerAuthMiddleware(asgi, api_key=cfg.server.api_key)
    asgi = RequestContextMiddleware(asgi)
    # Outermost, so that rejected (401, 400, 413, 429) requests are counted too.
    asgi = instrument(asgi, {"target": target, "draft": draft})
    return ServerApp(asgi, app, client, admission, trimmer)

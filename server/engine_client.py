"""An EngineClient for vLLM's own OpenAI serving code that inserts the draft-model scheduler.

vLLM's ``OpenAIServingChat`` / ``OpenAIServingCompletion`` do the protocol (rendering chat
templates, sampling-parameter validation, streaming, logprobs, errors); they call
``engine_client.generate(engine_input, sampling_params, request_id, ...)``. We hand them this
wrapper instead of the bare target ``AsyncLLM``: ``generate`` first asks the scheduler for a
plan (which may shorten the prompt or prepare a compressed KV), then streams the target's
outputs, restoring the user's original prompt so that ``usage.prompt_tokens`` stays the
length of the prompt the user sent. Everything else is delegated to the target engine.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from specapprox_vllm.frontend.outputs import Answered, Continuation, hold_open, streams
from specapprox_vllm.frontend.scheduler import ApproxStats, DraftScheduler, Plan
from specapprox_vllm.policies import ApproxConfig


@dataclass
class RequestApprox:
    """Per-HTTP-request state shared between the API middleware and ``generate``: the
    validated settings, and the statistics of each engine request it caused."""

    config: ApproxConfig
    stats: list[ApproxStats] = field(default_factory=list)
    # the target requests it streams from: what a deadline aborts explicitly (abort_requests)
    engine_requests: list[str] = field(default_factory=list)
    # perf_counter() when the first generated token reached the API process (TTFT metric)
    first_token_at: float | None = None


CURRENT_REQUEST: contextvars.ContextVar[RequestApprox | None] = contextvars.ContextVar(
    "specapprox_request", default=None
)


class ApproxEngineClient:
    """Target ``AsyncLLM`` + draft scheduler, with the ``EngineClient`` surface vLLM uses."""

    def __init__(self, target: Any, scheduler: DraftScheduler, default_config: ApproxConfig,
                 draft: Any | None = None) -> None:
        self.target = target
        self.draft = draft
        self.scheduler = scheduler
        self.default_config = default_config

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not defined here: model_config, renderer, abort, ...
        return getattr(self.target, name)

    @property
    def engines(self) -> list[Any]:
        return [e for e in (self.target, self.draft) if e is not None]

    @property
    def errored(self) -> bool:
        return any(e.errored for e in self.engines)

    async def check_health(self) -> None:
        for engine in self.engines:
            await engine.check_health()

    async def generate(
        self, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any
    ) -> AsyncGenerator[Any, None]:
        ctx = CURRENT_REQUEST.get()
        async for out in self._generate(ctx, prompt, sampling_params, request_id, **kwargs):
            if ctx is not None and ctx.first_token_at is None and \
                    any(o.token_ids for o in out.outputs):
                ctx.first_token_at = time.perf_counter()
            yield out

    async def _generate(
        self, ctx: RequestApprox | None, prompt: Any, sampling_params: Any, request_id: str,
        **kwargs: Any
    ) -> AsyncGenerator[Any, None]:
        cfg = ctx.config if ctx is not None else self.default_config
        token_ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        if token_ids is None:
            # Not a token prompt (embeddings, multimodal): nothing to approximate.
            async for out in self.target.generate(prompt, sampling_params, request_id,
                                                  **kwargs):
                yield out
            return
        token_ids = list(token_ids)
        plan = await self.scheduler.plan(token_ids, sampling_params, cfg, request_id,
                                         cache_salt=prompt.get("cache_salt"))
        if ctx is not None:
            ctx.stats.append(plan.stats)
            ctx.engine_requests.append(request_id)
        try:
            join = None
            if plan.lookahead is not None:
                # Self-draft: the answer's first tokens, streamed as they come; then the rest.
                la = plan.lookahead
                if ctx is not None:
                    ctx.engine_requests.append(la.request_id)
                first, answered = None, Answered(sampling_params)
                async for out in self.target.generate(prompt, la.sampling_params,
                                                      la.request_id, **kwargs):
                    answered.add(out)
                    if out.finished:
                        first = out
                    elif streams(sampling_params):
                        yield out
                if first is None:  # the engine ended the stream without a final output
                    return
                rest = await la.resume(first, answered.token_ids)
                if rest is None:  # the answer ended within the lookahead
                    yield first
                    return
                join = Continuation(first, sampling_params)
                plan = rest
                if streams(sampling_params):
                    yield hold_open(first)
            async for out in self._serve(plan, prompt, token_ids, sampling_params, request_id,
                                         **kwargs):
                yield join(out) if join is not None else out
        finally:
            if plan.release is not None:
                await plan.release()

    async def _serve(self, plan: Plan, prompt: dict[str, Any], token_ids: list[int],
                     sampling_params: Any, request_id: str, **kwargs: Any
                     ) -> AsyncGenerator[Any, None]:
        """The target request of ``plan``, its outputs showing the user's own prompt."""
        target_prompt = prompt
        if plan.prompt_token_ids != token_ids or plan.cache_salt is not None:
            target_prompt = {k: v for k, v in prompt.items()
                             if k not in ("prompt", "prompt_token_offsets")}
            target_prompt["prompt_token_ids"] = plan.prompt_token_ids
            if plan.cache_salt is not None:
                target_prompt["cache_salt"] = plan.cache_salt
        params = plan.sampling_params if plan.sampling_params is not None else sampling_params
        async for out in self.target.generate(target_prompt, params, request_id, **kwargs):
            if out.finished and plan.on_output is not None:
                plan.on_output(out)
            if plan.cached_tokens is not None:  # usage.prompt_tokens_details.cached_tokens
                out.num_cached_tokens = plan.cached_tokens
            if target_prompt is not prompt:
                out.prompt_token_ids = list(token_ids)  # a copy per output
                if prompt.get("prompt") is not None:
                    out.prompt = prompt["prompt"]
            yield out

    async def abort_requests(self, request_ids: list[str]) -> None:
        """Abort these target requests, whether or not they are still running (a finished
        one is a no-op). Why not rely on the stream being closed: a streaming response whose
        send failed leaves its generator to the garbage collector, and the engine request
        then ran on to ``max_tokens`` (seen once in a few hundred deadline tests)."""
        with contextlib.suppress(Exception):
            await self.target.abort(list(request_ids))

    def shutdown(self, timeout: float | None = None) -> None:
        for engine in self.engines:
            engine.shutdown()

"""Runs draft requests on the draft ``AsyncLLM`` and collects the prompt scores its workers
computed.

A scored draft request is an ordinary vLLM request (batched, chunked, prefix-cached like any
other) whose ``extra_args`` carry a :class:`~specapprox_vllm.wire.ScoringSpec`; the workers
score the prompt with the method's own hooks (``specapprox_vllm/worker/prompt_scores.py``).
After it finishes, the scores are pulled from every worker with ``collective_rpc`` and folded
with the policy (each tensor-parallel rank saw only its own heads).

Every public call is bounded by ``timeout_s`` and turns any failure of the draft (an exception,
a dead engine, a timeout) into :class:`DraftFailure`, so that the scheduler can apply the
server's ``on_draft_failure`` policy in one place; a timed-out or cancelled draft request is
aborted in the engine (``AsyncLLM.generate`` aborts on cancellation) and its captured scores
are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from specapprox_vllm import vllm_compat
from specapprox_vllm.policies import Policy
from specapprox_vllm.wire import PROMPT_SCORES_KEY, RPC, ScoringSpec, token_prompt

T = TypeVar("T")
DRAFT_GENERATION_KEYS = ("repetition_penalty", "presence_penalty", "frequency_penalty")


class DraftError(RuntimeError):
    pass


class DraftFailure(RuntimeError):
    """The draft stage of a request failed; ``kind`` is ``draft_error`` or ``draft_timeout``
    (reported in ``usage.approx.fallback`` when the server falls back)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass
class DraftResult:
    tokens: list[int]
    score: torch.Tensor | None  # [L] SpecPC token scores (float32), when requested
    ms: float
    capture_ms: float = 0.0
    retried_without_prefix_cache: bool = False
    cached_tokens: int = 0  # prompt tokens the (last) draft request read from the prefix cache


class DraftRunner:
    def __init__(self, engine: Any, timeout_s: float | None = None) -> None:
        self.engine = engine
        self.timeout_s = timeout_s

    async def _guarded(self, work: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(work, self.timeout_s)
        except asyncio.TimeoutError:
            raise DraftFailure("draft_timeout",
                               f"the draft stage took longer than {self.timeout_s} s") from None
        except DraftFailure:
            raise
        except Exception as e:  # noqa: BLE001 - any draft fault is the policy's to handle
            raise DraftFailure("draft_error", f"{type(e).__name__}: {e}"[:300]) from e

    @functools.cached_property
    def sampling_defaults(self) -> dict[str, Any]:
        """The draft checkpoint's ``generation_config`` penalties, read as vLLM's OpenAI
        serving path reads the target's (``vllm_compat.generation_defaults``) and applied the
        same way; the reference's HF draft applies them in ``generate``. Its sampling-shape
        keys (temperature, top-p/k, min-p) do not apply: the draft decodes greedily."""
        defaults = vllm_compat.generation_defaults(self.engine)
        return {k: defaults[k] for k in DRAFT_GENERATION_KEYS if defaults.get(k) is not None}

    @property
    def num_layers(self) -> int:
        return int(self.engine.model_config.hf_config.num_hidden_layers)

    async def _generate(self, prompt_ids: list[int], max_tokens: int, request_id: str,
                        extra_args: dict[str, Any] | None = None,
                        skip_reading_prefix_cache: bool = False,
                        cache_salt: str | None = None) -> tuple[list[int], int]:
        """The draft's tokens and how many prompt tokens it read from the prefix cache."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra_args,
                                skip_reading_prefix_cache=skip_reading_prefix_cache,
                                detokenize=False, **self.sampling_defaults)
        final = None
        async for out in self.engine.generate(token_prompt(prompt_ids, cache_salt), params,
                                              request_id):
            final = out
        if final is None or not final.outputs:
            raise DraftError(f"draft request {request_id} produced no output")
        return list(final.outputs[0].token_ids), int(final.num_cached_tokens or 0)

    async def _pop(self, key: str) -> list[dict[str, Any]]:
        results = await self.engine.collective_rpc(RPC.POP_PROMPT_SCORES, args=([key],))
        return [r[key] for r in results if r and key in r]

    async def _drop_capture(self, key: str) -> None:
        """Forget what an abandoned request captured (best effort: the engine may be gone)."""
        with contextlib.suppress(Exception):
            await self._pop(key)

    async def score_prompt(self, prompt_ids: list[int], policy: Policy, lookahead: int,
                           request_id: str, cache_salt: str | None = None) -> DraftResult:
        """Draft ``lookahead`` greedy tokens from ``prompt_ids`` and score the prompt with
        ``policy``'s hooks."""
        return await self._guarded(self._score_prompt(prompt_ids, policy, lookahead,
                                                      request_id, cache_salt))

    async def _score_prompt(self, prompt_ids: list[int], policy: Policy, lookahead: int,
                            request_id: str, cache_salt: str | None = None) -> DraftResult:
        t0 = time.perf_counter()
        retried = False
        for skip_cache in (False, True):
            key = uuid.uuid4().hex
            spec = ScoringSpec.for_policy(key, policy, len(prompt_ids), lookahead)
            try:
                tokens, cached = await self._generate(prompt_ids, lookahead,
                                              f"{request_id}-draft-{key}",
                                              {PROMPT_SCORES_KEY: spec.to_extra()}, skip_cache,
                                              cache_salt)
            except BaseException:
                await self._drop_capture(key)
                raise
            parts = await self._pop(key)
            if not parts:
                raise DraftError("the draft engine computed no prompt scores (is the "
                                 "specapprox plugin loaded in its workers?)")
            errors = [p["error"] for p in parts if p["error"]]
            if errors:
                raise DraftError(f"prompt scoring failed in the draft workers: {errors[0]}")
            if all(p["complete"] for p in parts):
                score = None
                for p in parts:  # tensor-parallel ranks: each scored its own heads
                    score = policy.fold(score, torch.tensor(p["score"]))
                return DraftResult(tokens, score, 1e3 * (time.perf_counter() - t0),
                                   sum(p["ms"] for p in parts), retried, cached)
            # Scoring rows were served from the prefix cache and never computed.
            retried = True
        raise DraftError("draft prompt scores incomplete even without prefix caching")

    async def generate(self, prompt_ids: list[int], max_tokens: int,
                       request_id: str, cache_salt: str | None = None) -> DraftResult:
        """Plain greedy draft tokens (SpecKV's lookahead), no capture."""
        t0 = time.perf_counter()
        tokens, cached = await self._guarded(self._generate(
            prompt_ids, max_tokens, f"{request_id}-draft-{uuid.uuid4().hex}",
            cache_salt=cache_salt))
        return DraftResult(tokens, None, 1e3 * (time.perf_counter() - t0), cached_tokens=cached)


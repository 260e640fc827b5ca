"""The target engine's two requests for one KV-compressed request (design: docs/design.md).

1. The *scoring request*: ``P + D`` with ``max_tokens=1`` and a
   :class:`~specapprox_vllm.wire.ScoringSpec` in ``extra_args``. vLLM prefills it like any
   request (chunked, batched, reading and publishing prefix blocks: its KV is the ordinary,
   uncompressed KV of ``P + D``); the workers score it with the method's hooks and, at the last
   token, store each layer's ``C`` kept entries per KV head
   (``specapprox_vllm/worker/kv_compaction.py``). Its sampled token is discarded and its
   blocks are freed when it finishes.
2. The *decode request*: ``C`` placeholder tokens + ``P[L-1]`` with the user's sampling
   parameters, a unique ``cache_salt`` and ``kv_transfer_params`` naming the stored entry; the
   KV connector (``specapprox_vllm/worker/kv_connector.py``) writes the stored rows into its first
   ``C`` slots, and decoding runs from ``P[L-1]`` at position ``C`` over re-rotated keys.

Placeholders are the ``C`` prompt tokens before ``P[L-1]``: no computation reads them (their
KV is injected). Penalties would count them instead of ``P``: the decode request carries its
penalties in ``extra_args`` for the target's logits processor, which counts ``P`` and the
outputs (:mod:`specapprox_vllm.worker.penalties`). Prompt logprobs would see them too; the
handler rejects prompt logprobs for these methods.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from specapprox_vllm.policies import Policy
from specapprox_vllm.vllm_compat import kv_geometry
from specapprox_vllm.wire import (
    KV_COMPACTION_KEY,
    LOAD_KEY,
    PENALTY_KEY,
    RPC,
    ScoringSpec,
    token_prompt,
)


class KVCompactError(RuntimeError):
    pass


@dataclass
class KVHandle:
    """A compacted KV entry stored in the target's workers, ready for a decode request."""

    key: str
    prompt_len: int
    budget: int
    n_draft: int
    worker_ms: float  # capture + select + gather + re-rotate, summed over layers (max rank)
    wall_ms: float  # the scoring request, end to end (includes queueing behind others)
    retried_without_prefix_cache: bool = False
    cached_tokens: int = 0  # prompt tokens the scoring request read from the prefix cache
    recomputed: bool = False  # the scoring request was preempted and recomputed
    indices: dict[str, list[list[int]]] | None = None  # layer -> [H_kv][C] (tests only)


def _has_penalties(params: Any) -> bool:
    return (getattr(params, "repetition_penalty", 1.0) != 1.0
            or getattr(params, "presence_penalty", 0.0) != 0.0
            or getattr(params, "frequency_penalty", 0.0) != 0.0)


class TargetKVRunner:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.geometry = kv_geometry(engine)

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    def scoring_params(self, policy: Policy, prompt_len: int, n_draft: int,
                       base: Any | None = None, want_indices: bool = False,
                       skip_cache: bool = False) -> tuple[str, Any]:
        """A fresh key and the sampling parameters that flag a request for KV compaction:
        ``base`` (the user's, for a self-drafted lookahead) or a one-token greedy request."""
        from vllm import SamplingParams

        key = uuid.uuid4().hex
        extra = {KV_COMPACTION_KEY: ScoringSpec.for_policy(
            key, policy, prompt_len, n_draft, want_indices).to_extra()}
        if base is None:
            return key, SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                       extra_args=extra, skip_reading_prefix_cache=skip_cache)
        params = base.clone()
        params.extra_args = {**(params.extra_args or {}), **extra}
        return key, params

    async def collect(self, key: str, prompt_len: int, policy: Policy, n_draft: int,
                      t0: float, want_indices: bool = False, retried: bool = False,
                      cached: int = 0) -> KVHandle | None:
        """The handle of a finished scoring request's stored entry; None when its scoring
        rows came from the prefix cache (never computed: score again without it)."""
        try:
            results = await self.engine.collective_rpc(RPC.KV_RESULTS, args=([key],
                                                                             want_indices))
        except BaseException:
            await self.drop(key)
            raise
        parts = [r[key] for r in results if r and key in r]
        errors = [p["error"] for p in parts if p["error"]]
        if not parts or errors or any(p["layers"] != self.num_layers for p in parts):
            await self.drop(key)
            if errors and all(e.startswith("incomplete") for e in errors):
                return None
            raise KVCompactError(
                "the target engine did not compact the KV cache: "
                + ("; ".join(errors) if errors else
                   f"{[p['layers'] for p in parts]} of {self.num_layers} layers "
                   "(is the specapprox plugin loaded in its workers?)"))
        indices = None
        if want_indices:
            indices = {}
            for part in parts:  # tensor-parallel ranks own disjoint heads
                for name, rows in part["indices"].items():
                    indices.setdefault(name, []).extend(rows)
        return KVHandle(key, prompt_len, policy.kv_entries(), n_draft,
                        max(p["ms"] for p in parts), 1e3 * (time.perf_counter() - t0),
                        retried, cached, any(p["recomputed"] for p in parts), indices)

    async def compact(self, prompt_ids: list[int], draft_tokens: list[int], policy: Policy,
                      request_id: str, want_indices: bool = False,
                      cache_salt: str | None = None) -> KVHandle:
        """Run the scoring request ``P + D`` and return the handle of the stored KV."""
        t0 = time.perf_counter()
        for skip_cache in (False, True):
            key, params = self.scoring_params(policy, len(prompt_ids), len(draft_tokens),
                                              want_indices=want_indices, skip_cache=skip_cache)
            cached = 0
            try:
                async for out in self.engine.generate(
                        token_prompt([*prompt_ids, *draft_tokens], cache_salt), params,
                        f"{request_id}-kvscore-{key}"):
                    cached = int(out.num_cached_tokens or 0)
            except BaseException:
                await self.drop(key)
                raise
            handle = await self.collect(key, len(prompt_ids), policy, len(draft_tokens), t0,
                                        want_indices, skip_cache, cached)
            if handle is not None:
                return handle
        raise KVCompactError("KV scoring incomplete even without prefix caching")

    @staticmethod
    def decode_request(handle: KVHandle, prompt_ids: list[int], sampling_params: Any,
                       continuation: list[int] = ()) -> tuple[list[int], Any, str]:
        """Prompt ids, sampling parameters and cache salt of the decode request.

        ``continuation``: output tokens already sent to the client (a self-drafted
        lookahead); they follow ``P[L-1]`` in the decode request's prompt, computed over the
        compacted KV, and count against ``max_tokens`` / ``min_tokens``."""
        c, length = handle.budget, len(prompt_ids)
        ids = [*prompt_ids[length - 1 - c: length - 1], prompt_ids[-1], *continuation]
        params = sampling_params.clone()
        params.extra_args = {**(params.extra_args or {}),
                             "kv_transfer_params": {LOAD_KEY: handle.key, "C": c}}
        if _has_penalties(params):
            # Counted over P and the continuation by the target's logits processor
            # (specapprox_vllm/worker/penalties.py), not over the placeholders.
            params.extra_args[PENALTY_KEY] = {
                "prompt": list(prompt_ids), "before": list(continuation),
                "repetition": params.repetition_penalty, "presence": params.presence_penalty,
                "frequency": params.frequency_penalty}
            params.repetition_penalty, params.presence_penalty = 1.0, 0.0
            params.frequency_penalty = 0.0
        if continuation:
            done = len(continuation)
            params.max_tokens = params.max_tokens - done
            params.min_tokens = max(0, params.min_tokens - done)
        return ids, params, f"specapprox-{handle.key}"

    async def drop(self, key: str) -> None:
        """Forget a stored entry in every worker (idempotent; the connector also frees it)."""
        await self.engine.collective_rpc(RPC.KV_DROP, args=([key],))

    async def store_info(self) -> list[dict[str, int]]:
        return await self.engine.collective_rpc(RPC.KV_STORE_INFO)

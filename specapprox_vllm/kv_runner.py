"""The target engine's two requests for one KV-compressed request (design: docs/design.md).

1. The *scoring request*: ``P + D`` with ``max_tokens=1`` and ``extra_args["specapprox_kv"]``.
   vLLM prefills it like any request (chunked, batched, reading and publishing prefix blocks:
   its KV is the ordinary, uncompressed KV of ``P + D``); the capture backend scores the
   window rows and, at the last token, stores each layer's ``C`` kept entries per KV head in
   the workers (:mod:`specapprox_vllm.kv_compact`). Its sampled token is discarded and its
   blocks are freed when it finishes.
2. The *decode request*: ``C`` placeholder tokens + ``P[L-1]`` with the user's sampling
   parameters, a unique ``cache_salt`` and ``kv_transfer_params`` naming the stored entry; the
   KV connector (:mod:`specapprox_vllm.kv_connector`) writes the stored rows into its first
   ``C`` slots, and decoding runs from ``P[L-1]`` at position ``C`` over re-rotated keys.

Placeholders are the ``C`` prompt tokens before ``P[L-1]``: no computation reads them (their
KV is injected), but ``repetition_penalty`` and prompt logprobs would see them instead of
``P``; the handler rejects prompt logprobs for these methods.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from specapprox_vllm.kv_compact import EXTRA_KEY, KVSpec
from specapprox_vllm.kv_connector import LOAD_KEY


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
    indices: dict[str, list[list[int]]] | None = None  # layer -> [H_kv][C] (tests only)


class TargetKVRunner:
    def __init__(self, engine: Any) -> None:
        self.engine = engine

    @property
    def num_layers(self) -> int:
        return int(self.engine.model_config.hf_config.num_hidden_layers)

    async def compact(self, prompt_ids: list[int], draft_tokens: list[int], cfg: Any,
                      request_id: str, want_indices: bool = False) -> KVHandle:
        """Run the scoring request and return the handle of the stored compacted KV."""
        from vllm import SamplingParams

        t0 = time.perf_counter()
        for skip_cache in (False, True):
            key = uuid.uuid4().hex
            spec = KVSpec(key=key, method=cfg.method, prompt_len=len(prompt_ids),
                          n_draft=len(draft_tokens), budget=cfg.kv_budget,
                          window=getattr(cfg, "window", 0), kernel=getattr(cfg, "kernel", 1),
                          sink_tokens=getattr(cfg, "sink_tokens", 0),
                          want_indices=want_indices)
            params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                    extra_args={EXTRA_KEY: asdict(spec)},
                                    skip_reading_prefix_cache=skip_cache)
            cached = 0
            try:
                async for out in self.engine.generate(
                        {"prompt_token_ids": [*prompt_ids, *draft_tokens]}, params,
                        f"{request_id}-kvscore-{key}"):
                    cached = int(out.num_cached_tokens or 0)
                results = await self.engine.collective_rpc(
                    "specapprox_kv_results", args=([key], want_indices))
            except BaseException:
                await self.drop(key)
                raise
            parts = [r[key] for r in results if r and key in r]
            errors = [p["error"] for p in parts if p["error"]]
            if not parts or errors or any(p["layers"] != self.num_layers for p in parts):
                await self.drop(key)
                if errors and all(e.startswith("incomplete") for e in errors) and not skip_cache:
                    continue  # window rows were prefix-cache hits: score them for real
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
            return KVHandle(key, len(prompt_ids), cfg.kv_budget, len(draft_tokens),
                            max(p["ms"] for p in parts), 1e3 * (time.perf_counter() - t0),
                            skip_cache, cached, indices)
        raise KVCompactError("KV scoring incomplete even without prefix caching")

    @staticmethod
    def decode_request(handle: KVHandle, prompt_ids: list[int], sampling_params: Any
                       ) -> tuple[list[int], Any, str]:
        """Prompt ids, sampling parameters and cache salt of the decode request."""
        c, length = handle.budget, len(prompt_ids)
        ids = [*prompt_ids[length - 1 - c: length - 1], prompt_ids[-1]]
        params = sampling_params.clone()
        params.extra_args = {**(params.extra_args or {}),
                             "kv_transfer_params": {LOAD_KEY: handle.key, "C": c}}
        return ids, params, f"specapprox-{handle.key}"

    async def drop(self, key: str) -> None:
        """Forget a stored entry in every worker (idempotent; the connector also frees it)."""
        await self.engine.collective_rpc("specapprox_kv_drop", args=([key],))

    async def store_info(self) -> list[dict[str, int]]:
        return await self.engine.collective_rpc("specapprox_kv_store_info")

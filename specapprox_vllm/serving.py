"""Each approximation method's serving path, attached to the draft scheduler.

A method is offered by the server only once its path through the engines exists; the
scheduler answers requests for any other method with a 400 that lists what is available.
"""

from __future__ import annotations

import time
from typing import Any

from specapprox_vllm.draft_runner import DraftRunner
from specapprox_vllm.draft_scheduler import ApproxStats, DraftScheduler, Plan
from specapprox_vllm.kv_connector import REPORT_KEY
from specapprox_vllm.kv_runner import TargetKVRunner
from specapprox_vllm.policies import ApproxConfig, build_policy

KV_METHODS = ("speckv", "snapkv", "streamingllm", "speckv_pc")


def check_start_layer(cfg: ApproxConfig, draft: DraftRunner) -> None:
    """SpecPC scoring (alone or in the cascade) records draft layers ``>= start_layer``."""
    if cfg.start_layer >= draft.num_layers:
        raise ValueError(f"start_layer: {cfg.start_layer} must be below the draft's "
                         f"{draft.num_layers} layers")


class SpecPCHandler:
    """SpecPC: the draft scores the prompt inside vLLM; the target serves ``P[idx]``."""

    def __init__(self, runner: DraftRunner) -> None:
        self.runner = runner

    def validate(self, cfg: ApproxConfig) -> None:
        check_start_layer(cfg, self.runner)

    async def __call__(self, prompt_ids: list[int], sampling_params: Any, cfg: ApproxConfig,
                       request_id: str) -> Plan:
        policy = build_policy(cfg)
        draft = await self.runner.score_prompt(
            prompt_ids, window=cfg.window,
            lookahead=policy.draft_tokens(getattr(sampling_params, "max_tokens", None)),
            start_layer=cfg.start_layer, weighted_query=cfg.weighted_query,
            request_id=request_id)
        t0 = time.perf_counter()
        idx = policy.select_prompt(draft.score)
        kept = prompt_ids if idx is None else [prompt_ids[i] for i in idx.tolist()]
        select_ms = 1e3 * (time.perf_counter() - t0)
        n = len(prompt_ids)
        return Plan(kept, ApproxStats(
            "specpc", idx is not None, n, len(kept), draft_tokens=len(draft.tokens),
            draft_ms=round(draft.ms, 3), select_ms=round(select_ms, 3)),
            extra={"draft_retried": draft.retried_without_prefix_cache})


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVHandler:
    """SpecKV, SnapKV-style, StreamingLLM and the SpecKV-PC cascade: one path through the
    target engine (scoring request, then decode request on the compacted KV); only what
    precedes it differs (a draft run, a draft run with SpecPC scoring, or nothing)."""

    def __init__(self, kv: TargetKVRunner, draft: DraftRunner | None) -> None:
        self.kv = kv
        self.draft = draft
        cache = kv.engine.vllm_config.cache_config
        model = kv.engine.model_config
        self.block_size = int(cache.block_size)
        # bytes of one token's K and V over all layers and KV heads (for kv_bytes_saved)
        self.token_bytes = (2 * self.kv.num_layers * model.get_total_num_kv_heads()
                            * model.get_head_size() * model.dtype.itemsize)

    def validate(self, cfg: ApproxConfig) -> None:
        if cfg.method == "speckv_pc" and self.draft is not None:
            check_start_layer(cfg, self.draft)

    async def _draft(self, policy: Any, prompt_ids: list[int], sampling_params: Any,
                     cfg: ApproxConfig, request_id: str) -> tuple[list[int], list[int], float]:
        """The draft stage: ``(prompt served to the target, draft tokens D, draft ms)``."""
        if not policy.needs_draft:
            return prompt_ids, [], 0.0
        assert self.draft is not None
        n = policy.draft_tokens(getattr(sampling_params, "max_tokens", None))
        if policy.prompt_applies(len(prompt_ids)):  # cascade: SpecPC first, same draft run
            d = await self.draft.score_prompt(
                prompt_ids, window=cfg.pc_window, lookahead=max(n, 1),
                start_layer=cfg.start_layer, weighted_query=cfg.weighted_query,
                request_id=request_id)
            idx = policy.select_prompt(d.score)
            if idx is not None:
                prompt_ids = [prompt_ids[i] for i in idx.tolist()]
            return prompt_ids, d.tokens, d.ms
        if n == 0:
            return prompt_ids, [], 0.0
        d = await self.draft.generate(prompt_ids, n, request_id)
        return prompt_ids, d.tokens, d.ms

    async def __call__(self, prompt_ids: list[int], sampling_params: Any, cfg: ApproxConfig,
                       request_id: str) -> Plan:
        if getattr(sampling_params, "prompt_logprobs", None) is not None:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(
                f"prompt_logprobs: approx.method {cfg.method} serves the prompt from a "
                "compacted KV cache and cannot return prompt log-probabilities",
                parameter="prompt_logprobs")
        policy = build_policy(cfg)
        n_in = len(prompt_ids)
        served, draft_tokens, draft_ms = await self._draft(policy, prompt_ids,
                                                           sampling_params, cfg, request_id)
        stats = ApproxStats(cfg.method, len(served) < n_in, n_in, len(served),
                            draft_tokens=len(draft_tokens), draft_ms=round(draft_ms, 3))
        if len(served) <= cfg.kv_budget:  # cascade: the compressed prompt fits the budget
            stats.reason = None if stats.applied else "prompt_within_budget"
            return Plan(served, stats)
        handle = await self.kv.compact(served, draft_tokens, cfg, request_id)
        ids, params, salt = self.kv.decode_request(handle, served, sampling_params)
        stats.applied = True
        stats.kv_entries_kept = cfg.kv_budget
        stats.select_ms = round(handle.worker_ms, 3)
        stats.score_ms = round(handle.wall_ms, 3)
        stats.kv_blocks_before = _cdiv(len(served), self.block_size)

        def on_output(out: Any) -> None:
            report = (getattr(out, "kv_transfer_params", None) or {}).get(REPORT_KEY)
            if report is None:
                return
            out.kv_transfer_params = None  # ours, not the client's
            stats.kv_blocks_after = report.get("blocks_at_admission")
            stats.kv_loads = report.get("loads")
            if stats.kv_blocks_after is not None:
                stats.kv_bytes_saved = ((stats.kv_blocks_before - stats.kv_blocks_after)
                                        * self.block_size * self.token_bytes)

        async def release() -> None:
            await self.kv.drop(handle.key)

        return Plan(ids, stats, extra={"kv_key": handle.key, "kv_retried":
                                       handle.retried_without_prefix_cache},
                    sampling_params=params, cache_salt=salt, on_output=on_output,
                    release=release)


def register_methods(scheduler: DraftScheduler, target: Any, draft: Any | None,
                     draft_timeout_s: float | None = None) -> None:
    """Attach the handlers whose engines are present. ``none`` is always served; methods
    that need the draft are offered only with a draft engine."""
    draft_runner = DraftRunner(draft, draft_timeout_s) if draft is not None else None
    kv = KVHandler(TargetKVRunner(target), draft_runner)
    for method in KV_METHODS:
        if method in ("snapkv", "streamingllm") or draft_runner is not None:
            scheduler.add_handler(method, kv)
    if draft_runner is not None:
        scheduler.add_handler("specpc", SpecPCHandler(draft_runner))

"""The one serving path of every approximation method, steered by the policy's facts.

1. **Draft** (``needs_draft``): the draft engine generates ``draft_tokens(max_tokens)``
   tokens ``D``; when ``prompt_applies(L)`` the same run scores the prompt with the policy's
   hooks, and ``select_prompt`` gives the prompt the target serves (SpecPC; the cascade's
   first stage).
2. **KV** (``compresses_kv`` and ``kv_applies`` on the served prompt): the target's scoring
   request ``P + D`` selects ``kv_entries()`` entries per layer and KV head in its workers, and
   the decode request runs on the compacted KV (:mod:`.target_runner`).

A method that compresses only the prompt ends after 1 with a shorter prompt for an ordinary
target request; a draft-free KV method skips 1. Nothing here names a method.
"""

from __future__ import annotations

import time
from typing import Any

from specapprox_vllm.frontend.draft_runner import DraftRunner
from specapprox_vllm.frontend.scheduler import ApproxStats, DraftScheduler, Plan
from specapprox_vllm.frontend.target_runner import KVHandle, TargetKVRunner
from specapprox_vllm.policies import Policy
from specapprox_vllm.wire import REPORT_KEY


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class MethodPipeline:
    """Draft run, prompt selection and KV compaction for one request. ``want_indices``
    makes the workers report the kept positions (tests)."""

    def __init__(self, target: TargetKVRunner | None, draft: DraftRunner | None,
                 want_indices: bool = False) -> None:
        self.target = target
        self.draft = draft
        self.want_indices = want_indices

    @property
    def has_draft(self) -> bool:
        return self.draft is not None

    def check(self, policy: Policy) -> None:
        """Settings the engines cannot serve (``ValueError`` naming the field)."""
        if policy.needs_draft and self.draft is not None:
            policy.check_draft(self.draft.num_layers)

    async def __call__(self, policy: Policy, prompt_ids: list[int], sampling_params: Any,
                       request_id: str) -> Plan:
        if policy.compresses_kv and getattr(sampling_params, "prompt_logprobs", None) is not None:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(
                f"prompt_logprobs: approx.method {policy.name} serves the prompt from a "
                "compacted KV cache and cannot return prompt log-probabilities",
                parameter="prompt_logprobs")
        n_in = len(prompt_ids)
        stats = ApproxStats(policy.name, False, n_in, n_in)
        served, draft_tokens = prompt_ids, []
        extra: dict[str, Any] = {}
        if policy.needs_draft:
            assert self.draft is not None
            n = policy.draft_tokens(getattr(sampling_params, "max_tokens", None))
            if policy.prompt_applies(n_in):
                d = await self.draft.score_prompt(prompt_ids, policy, n, request_id)
                t0 = time.perf_counter()
                idx = policy.select_prompt(d.score)
                if idx is not None:
                    served = [prompt_ids[i] for i in idx.tolist()]
                stats.select_ms = round(1e3 * (time.perf_counter() - t0), 3)
                extra["draft_retried"] = d.retried_without_prefix_cache
            elif n > 0:
                d = await self.draft.generate(prompt_ids, n, request_id)
            else:
                d = None
            if d is not None:
                draft_tokens = d.tokens
                stats.draft_tokens, stats.draft_ms = len(d.tokens), round(d.ms, 3)
        stats.prompt_tokens_kept = len(served)
        stats.applied = len(served) < n_in
        if not (policy.compresses_kv and policy.kv_applies(len(served))):
            if policy.compresses_kv and not stats.applied:
                stats.reason = "prompt_within_budget"
            return Plan(served, stats, extra=extra)
        assert self.target is not None
        handle = await self.target.compact(served, draft_tokens, policy, request_id,
                                           self.want_indices)
        return self._decode_plan(handle, served, sampling_params, stats)

    def _decode_plan(self, handle: KVHandle, served: list[int], sampling_params: Any,
                     stats: ApproxStats) -> Plan:
        """The decode request on the compacted KV, and its ``usage.approx`` accounting."""
        assert self.target is not None
        ids, params, salt = self.target.decode_request(handle, served, sampling_params)
        geometry = self.target.geometry
        stats.applied = True
        stats.kv_entries_kept = handle.budget
        stats.select_ms = round(handle.worker_ms, 3)
        stats.score_ms = round(handle.wall_ms, 3)
        stats.kv_blocks_before = _cdiv(len(served), geometry.block_size)

        def on_output(out: Any) -> None:
            report = (getattr(out, "kv_transfer_params", None) or {}).get(REPORT_KEY)
            if report is None:
                return
            out.kv_transfer_params = None  # ours, not the client's
            stats.kv_blocks_after = report.get("blocks_at_admission")
            stats.kv_loads = report.get("loads")
            if stats.kv_blocks_after is not None:
                stats.kv_bytes_saved = ((stats.kv_blocks_before - stats.kv_blocks_after)
                                        * geometry.block_size * geometry.token_bytes)

        async def release() -> None:
            await self.target.drop(handle.key)

        extra = {"kv_key": handle.key, "kv_retried": handle.retried_without_prefix_cache}
        if handle.indices is not None:
            extra["kv_indices"] = handle.indices
        return Plan(ids, stats, extra=extra, sampling_params=params, cache_salt=salt,
                    on_output=on_output, release=release)


def build_scheduler(target: Any, draft: Any | None, draft_timeout_s: float | None = None,
                    on_draft_failure: str = "fallback", want_indices: bool = False
                    ) -> DraftScheduler:
    """The draft scheduler of a server with these engines (``draft``: None without one)."""
    draft_runner = DraftRunner(draft, draft_timeout_s) if draft is not None else None
    pipeline = MethodPipeline(TargetKVRunner(target), draft_runner, want_indices=want_indices)
    return DraftScheduler(pipeline, on_draft_failure=on_draft_failure)

"""The one serving path of every approximation method, steered by the policy's facts.

1. **Draft** (``needs_draft``): the draft engine generates ``draft_tokens(max_tokens)``
   tokens ``D``; when ``prompt_applies(L)`` the same run scores the prompt with the policy's
   hooks, and ``select_prompt`` gives the prompt the target serves (SpecPC; the cascade's
   first stage).
2. **KV** (``compresses_kv`` and ``kv_applies`` on the served prompt): the target's scoring
   request ``P + D`` selects ``kv_entries()`` entries per layer and KV head in its workers, and
   the decode request runs on the compacted KV (:mod:`.target_runner`). When the target is its
   own draft, the scoring request is the answer's first phase instead (:meth:`MethodPipeline.
   _self_draft`).

A method that compresses only the prompt ends after 1 with a shorter prompt for an ordinary
target request; a draft-free KV method skips 1. Nothing here names a method.
"""

from __future__ import annotations

import time
from typing import Any

from specapprox_vllm.frontend.draft_runner import DraftRunner
from specapprox_vllm.frontend.scheduler import ApproxStats, DraftScheduler, Lookahead, Plan
from specapprox_vllm.frontend.target_runner import KVHandle, TargetKVRunner
from specapprox_vllm.policies import Policy
from specapprox_vllm.wire import REPORT_KEY


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class MethodPipeline:
    """Draft run, prompt selection and KV compaction for one request.

    ``draft`` runs on the draft engine, or on the target engine itself when ``self_draft``
    (the one-model server): then SpecKV-style methods take their lookahead from the answer's
    own first tokens (:meth:`_self_draft`), and prompt methods score on the target engine.
    ``want_indices`` makes the workers report the kept positions (tests)."""

    def __init__(self, target: TargetKVRunner | None, draft: DraftRunner | None,
                 self_draft: bool = False, want_indices: bool = False) -> None:
        self.target = target
        self.draft = draft
        self.self_draft = self_draft
        self.want_indices = want_indices

    @property
    def has_draft(self) -> bool:
        return self.draft is not None

    def check(self, policy: Policy) -> None:
        """Settings the engines cannot serve (``ValueError`` naming the field)."""
        if policy.needs_draft and self.draft is not None:
            policy.check_draft(self.draft.num_layers)

    def _streams_lookahead(self, policy: Policy, prompt_len: int, params: Any) -> bool:
        """Self-draft applies when the draft's only job is the lookahead ``D`` (a KV method
        whose prompt stage, if any, leaves this prompt alone), for one sequence without a
        grammar (a continuation could not resume a grammar's state)."""
        return (self.self_draft and policy.needs_draft and policy.compresses_kv
                and not policy.prompt_applies(prompt_len) and policy.kv_applies(prompt_len)
                and getattr(params, "n", 1) == 1
                and getattr(params, "structured_outputs", None) is None
                and policy.draft_tokens(getattr(params, "max_tokens", None)) > 0)

    async def __call__(self, policy: Policy, prompt_ids: list[int], sampling_params: Any,
                       request_id: str, cache_salt: str | None = None) -> Plan:
        if policy.compresses_kv and getattr(sampling_params, "prompt_logprobs", None) is not None:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(
                f"prompt_logprobs: approx.method {policy.name} serves the prompt from a "
                "compacted KV cache and cannot return prompt log-probabilities",
                parameter="prompt_logprobs")
        n_in = len(prompt_ids)
        stats = ApproxStats(policy.name, False, n_in, n_in)
        if self._streams_lookahead(policy, n_in, sampling_params):
            return self._self_draft(policy, prompt_ids, sampling_params, request_id, stats,
                                    cache_salt)
        served, draft_tokens = prompt_ids, []
        extra: dict[str, Any] = {}
        if policy.needs_draft:
            assert self.draft is not None
            n = policy.draft_tokens(getattr(sampling_params, "max_tokens", None))
            if policy.prompt_applies(n_in):
                d = await self.draft.score_prompt(prompt_ids, policy, n, request_id,
                                                  cache_salt=cache_salt)
                t0 = time.perf_counter()
                idx = policy.select_prompt(d.score)
                if idx is not None:
                    served = [prompt_ids[i] for i in idx.tolist()]
                    if self.want_indices:
                        extra["prompt_indices"] = idx.tolist()
                stats.select_ms = round(1e3 * (time.perf_counter() - t0), 3)
                extra["draft_retried"] = d.retried_without_prefix_cache
            elif n > 0:
                d = await self.draft.generate(prompt_ids, n, request_id, cache_salt=cache_salt)
            else:
                d = None
            if d is not None:
                draft_tokens = d.tokens
                stats.draft_tokens, stats.draft_ms = len(d.tokens), round(d.ms, 3)
                stats.lookahead_source = "target" if self.self_draft else "draft"
        stats.prompt_tokens_kept = len(served)
        stats.applied = len(served) < n_in
        if not (policy.compresses_kv and policy.kv_applies(len(served))):
            if policy.compresses_kv and not stats.applied:
                stats.reason = "prompt_within_budget"
            return Plan(served, stats, extra=extra)
        assert self.target is not None
        handle = await self.target.compact(served, draft_tokens, policy, request_id,
                                           self.want_indices, cache_salt=cache_salt)
        plan = self._decode_plan(handle, served, sampling_params, stats)
        plan.extra.update(extra, draft_tokens=draft_tokens)
        return plan

    def _self_draft(self, policy: Policy, prompt_ids: list[int], sampling_params: Any,
                    request_id: str, stats: ApproxStats, cache_salt: str | None = None
                    ) -> Plan:
        """ALGORITHMS.md, "Self-draft": the target serves ``P`` with the user's sampling
        parameters for ``n + 1`` tokens, flagged for KV compaction with ``D`` = its first
        ``n``; the client gets those tokens as they come (they are exact), and the workers
        compact when ``D[n-1]`` is fed. The decode request then continues after them from the
        compacted KV: one prefill of ``P``, no draft engine, no second copy of the weights."""
        assert self.target is not None
        n = policy.draft_tokens(sampling_params.max_tokens)
        stats.lookahead_source = "self"
        if sampling_params.max_tokens is None or sampling_params.max_tokens <= n + 1:
            stats.reason = "answer_within_lookahead"
            return Plan(prompt_ids, stats)
        key, params = self.target.scoring_params(policy, len(prompt_ids), n, sampling_params,
                                                 self.want_indices)
        params.max_tokens = n + 1  # feeding D[n-1] scores it, and samples one more exact token
        params.min_tokens = min(params.min_tokens, n + 1)
        t0 = time.perf_counter()

        async def resume(first: Any, tokens: list[int]) -> Plan | None:
            out = first.outputs[0]
            stats.draft_tokens = min(len(tokens), n)
            if len(tokens) < n + 1 or out.finish_reason != "length":
                await self.target.drop(key)  # the answer ended within the lookahead
                stats.reason = "answer_within_lookahead"
                return None
            handle = await self.target.collect(key, len(prompt_ids), policy, n, t0,
                                               self.want_indices,
                                               cached=int(first.num_cached_tokens or 0))
            if handle is None:  # scoring rows were prefix-cache hits: score P + D for real
                handle = await self.target.compact(prompt_ids, tokens[:n], policy, request_id,
                                                   self.want_indices, cache_salt=cache_salt)
            return self._decode_plan(handle, prompt_ids, sampling_params, stats, tokens)

        async def release() -> None:
            await self.target.drop(key)

        return Plan(prompt_ids, stats, release=release,
                    lookahead=Lookahead(params, f"{request_id}-la-{key}", resume))

    def _decode_plan(self, handle: KVHandle, served: list[int], sampling_params: Any,
                     stats: ApproxStats, continuation: list[int] = ()) -> Plan:
        """The decode request on the compacted KV, and its ``usage.approx`` accounting."""
        assert self.target is not None
        ids, params, salt = self.target.decode_request(handle, served, sampling_params,
                                                       continuation)
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

        extra = {"kv_key": handle.key, "kv_retried": handle.retried_without_prefix_cache,
                 "kv_recomputed": handle.recomputed}
        if handle.indices is not None:
            extra["kv_indices"] = handle.indices
        return Plan(ids, stats, extra=extra, sampling_params=params, cache_salt=salt,
                    on_output=on_output, release=release, cached_tokens=handle.cached_tokens)


def build_scheduler(target: Any, draft: Any | None, draft_timeout_s: float | None = None,
                    on_draft_failure: str = "fallback", self_draft: bool = False,
                    want_indices: bool = False) -> DraftScheduler:
    """The draft scheduler of a server with these engines. ``self_draft``: the target is its
    own draft (``draft`` is then None, or the target engine itself); otherwise ``draft`` is
    the draft engine, or None when the server has none."""
    if self_draft:
        draft = target
    draft_runner = DraftRunner(draft, draft_timeout_s) if draft is not None else None
    pipeline = MethodPipeline(TargetKVRunner(target), draft_runner,
                              self_draft=self_draft or draft is target, want_indices=want_indices)
    return DraftScheduler(pipeline, on_draft_failure=on_draft_failure)

"""Each approximation method's serving path, attached to the draft scheduler.

A method is offered by the server only once its path through the engines exists; the
scheduler answers requests for any other method with a 400 that lists what is available.
"""

from __future__ import annotations

import time
from typing import Any

from specapprox_vllm.draft_runner import DraftRunner
from specapprox_vllm.draft_scheduler import ApproxStats, DraftScheduler, Plan
from specapprox_vllm.policies import ApproxConfig, build_policy


class SpecPCHandler:
    """SpecPC: the draft scores the prompt inside vLLM; the target serves ``P[idx]``."""

    def __init__(self, runner: DraftRunner) -> None:
        self.runner = runner

    def validate(self, cfg: ApproxConfig) -> None:
        if cfg.start_layer >= self.runner.num_layers:
            raise ValueError(f"start_layer: {cfg.start_layer} must be below the draft's "
                             f"{self.runner.num_layers} layers")

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


def register_methods(scheduler: DraftScheduler, target: Any, draft: Any | None) -> None:
    """Attach the handlers whose engines are present. ``none`` is always served."""
    del target  # SpecKV's target-side path attaches here once it lands
    if draft is not None:
        scheduler.add_handler("specpc", SpecPCHandler(DraftRunner(draft)))

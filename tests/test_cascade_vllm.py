"""The served cascade (SpecKV-PC) against the HF referee, with a real draft engine.

Two engines as in a two-model deployment: the draft (SmolLM2) scores the prompt while it
writes ``D`` (the cascade's lookahead: SpecKV's n, the request's max_tokens capped), the
target serves ``P' = P[kept]`` and keeps ``C`` KV entries per layer and head from the
scoring request ``P' + D``. For needle prompts of 2.5k-3.5k tokens: the draft tokens and the
kept prompt indices equal the referee's, the kept KV sets equal the referee's on ``P'`` with
the same ``D`` (up to stated near-ties at the cut), and so do the tokens (one may differ).
"""

from __future__ import annotations

import pytest
import torch

from specapprox_vllm.policies import build_policy, make_approx_config
from specapprox_vllm.tools.eval.needle import make_needle_case
from tests.conftest import require_model
from tests.test_self_draft import serve
from tests.test_speckv_vllm import near_tie_only, target_engine

pytestmark = pytest.mark.server
MAX_NEW = 24


def draft_engine():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from specapprox_vllm.wire import WORKER_EXTENSION

    return AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(require_model()), dtype="float32", max_model_len=4096, enforce_eager=True,
        kv_cache_memory_bytes=1 << 29, max_num_batched_tokens=512, enable_prefix_caching=True,
        enable_chunked_prefill=True, worker_extension_cls=WORKER_EXTENSION, seed=0))


@pytest.mark.timeout(2400)
async def test_served_cascade_equals_the_referee(referee, tokenizer) -> None:
    from vllm import SamplingParams

    from server.engine_client import ApproxEngineClient
    from specapprox_vllm.frontend.pipeline import build_scheduler

    draft = draft_engine()
    target = target_engine()
    try:
        scheduler = build_scheduler(target, draft, want_indices=True)
        client = ApproxEngineClient(target, scheduler, make_approx_config("none"), draft)
        client.plans = {}  # serve() reads self-drafted plans here; the cascade has none
        plans = {}
        plan = scheduler.plan

        async def recording(ids, params, cfg, rid, **kw):
            plans[rid] = await plan(ids, params, cfg, rid, **kw)
            return plans[rid]

        scheduler.plan = recording
        greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
        exact, near, same_tokens = 0, [], 0
        cases = ((2500, 1024, 128), (3000, 1536, 256), (3500, 2048, 256))
        for i, (length, c_pc, c_kv) in enumerate(cases):
            ids = make_needle_case(tokenizer, length, seed=400 + i, depth=0.3).prompt_ids
            cfg = make_approx_config("speckv_pc", {"prompt_budget": c_pc, "kv_budget": c_kv})
            policy = build_policy(cfg)
            tokens, stats, kept, _ = await serve(client, ids, cfg, greedy, f"casc{i}")
            extra = plans[f"casc{i}"].extra
            assert stats.applied and stats.lookahead_source == "draft"
            assert stats.prompt_tokens_kept == c_pc and stats.kv_entries_kept == c_kv
            n = policy.draft_tokens(MAX_NEW)
            ref_draft, ref_score = referee.run_draft(ids, n, cfg.pc_window, cfg.start_layer,
                                                     cfg.weighted_query)
            assert extra["draft_tokens"] == ref_draft and 0 < len(ref_draft) <= n  # EOS stops
            ref_idx = policy.select_prompt(ref_score)
            assert extra["prompt_indices"] == ref_idx.tolist()
            served = [ids[j] for j in ref_idx.tolist()]
            scores: list[torch.Tensor] = []
            ref_tokens, ref_kept = referee._speckv_decode(served, ref_draft, policy, MAX_NEW,
                                                          scores)
            kept = torch.tensor([extra["kv_indices"][f"model.layers.{j}.self_attn.attn"]
                                 for j in range(len(extra["kv_indices"]))])
            if torch.equal(kept, ref_kept):
                exact += 1
            else:
                assert near_tie_only(kept, ref_kept, scores, cfg), f"case {i}"
                near.append(i)
            same_tokens += tokens == ref_tokens
        print(f"cascade kept KV sets: {exact}/{len(cases)} exact, near-ties in {near}")
        assert len(near) <= 1 and same_tokens >= len(cases) - 1, (near, same_tokens)
    finally:
        target.shutdown()
        draft.shutdown()

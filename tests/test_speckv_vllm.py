"""SpecKV inside vLLM's paged KV cache, against the HF referee (same model, fp32).

The target engine runs with chunked prefill forced to split every prompt (512-token chunks)
and prefix caching on. For 20 needle prompts of 1k-3k tokens and a fixed lookahead ``D``, the
kept (layer, KV head, position) sets computed inside vLLM must equal the referee's exactly,
and greedy decoding from the compacted, re-rotated KV must give the referee's SpecKV tokens
on at least 19 of 20. SnapKV-style and StreamingLLM go through the same path. Also: with
``C = L - 1`` nothing is evicted and the output equals plain vLLM; a prompt sharing a long
prefix with an earlier one reads it from the prefix cache and still selects exactly; a repeat
whose window rows would be served from the cache is detected and re-scored.
"""

from __future__ import annotations

import pytest
import torch

from specapprox_vllm.policies import build_policy, make_approx_config
from specapprox_vllm.tools.eval.needle import make_needle_case
from tests.conftest import require_model

pytestmark = pytest.mark.server
CHUNK = 512
MAX_NEW = 24
FIXED_DRAFT_TEXT = " The secret number mentioned in the text is"


def target_engine(**overrides):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from specapprox_vllm.wire import CONNECTOR_CONFIG, WORKER_EXTENSION

    args = dict(model=str(require_model()), dtype="float32", max_model_len=4096,
                enforce_eager=True, kv_cache_memory_bytes=1 << 30,
                max_num_batched_tokens=CHUNK, enable_prefix_caching=True,
                enable_chunked_prefill=True, worker_extension_cls=WORKER_EXTENSION, seed=0,
                kv_transfer_config=CONNECTOR_CONFIG)
    args.update(overrides)
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))


async def generate(engine, prompt: dict, params, request_id: str):
    final = None
    async for out in engine.generate(prompt, params, request_id):
        final = out
    return final


async def serve_compacted(engine, runner, ids, draft, cfg, rid: str, max_new: int = MAX_NEW):
    """Scoring request, then the decode request; returns (tokens, kept [l, h, C], handle,
    the engine's KV report)."""
    from vllm import SamplingParams

    handle = await runner.compact(ids, draft, build_policy(cfg), rid, want_indices=True)
    dids, params, salt = runner.decode_request(
        handle, ids, SamplingParams(max_tokens=max_new, temperature=0.0))
    out = await generate(engine, {"prompt_token_ids": dids, "cache_salt": salt}, params,
                         f"{rid}-decode")
    await runner.drop(handle.key)
    n_layers = len(handle.indices)
    kept = torch.tensor([handle.indices[f"model.layers.{i}.self_attn.attn"]
                         for i in range(n_layers)])
    return list(out.outputs[0].token_ids), kept, handle, out.kv_transfer_params["specapprox"]


# Kept sets must be equal, except where a kept/dropped pair sits at the cut within this
# relative band: vLLM's CPU kernels and HF's compute the same fp32 scores in different orders,
# and two CPUs of the same kind were seen to round one near-tie differently (issue 19). The
# case: case 10 (L = 2143, C = 256), layer 19, KV head 1, where two max-pooled windows
# (positions 964-966 and 1608-1610) score 2.2e-6 apart relative to the cut; one 2-core EPYC
# keeps the first, another the second (the greedy tokens are the same). 19/20 exact and one
# such near-tie there; 20/20 on the machine the test was written on.
NEAR_TIE_REL = 1e-4


def near_tie_only(kept: torch.Tensor, ref_kept: torch.Tensor, scores: list[torch.Tensor],
                  cfg) -> bool:
    """Whether every (layer, head) whose kept set differs from the referee's differs only by
    positions whose pooled referee score lies within ``NEAR_TIE_REL`` of the cut."""
    from specapprox_vllm.policies import pool1d

    for layer, head in torch.nonzero((kept != ref_kept).any(dim=-1)).tolist():
        pooled = pool1d(scores[layer][head].float(), cfg.kernel, "max")
        cut = pooled.sort(descending=True).values[cfg.kv_budget - cfg.window - 1]
        diff = set(kept[layer, head].tolist()) ^ set(ref_kept[layer, head].tolist())
        if any(abs(pooled[p] - cut) > NEAR_TIE_REL * cut for p in diff):
            return False
    return True


def cases(tokenizer, count: int):
    lengths = torch.linspace(1000, 3000, count).round().long().tolist()
    for i, length in enumerate(lengths):
        yield make_needle_case(tokenizer, length, seed=100 + i, depth=(i % 5) / 4)


@pytest.mark.timeout(2400)
async def test_speckv_in_vllm_equals_the_referee(referee, tokenizer) -> None:
    from specapprox_vllm.frontend.target_runner import TargetKVRunner

    draft = tokenizer.encode(FIXED_DRAFT_TEXT, add_special_tokens=False)
    engine = target_engine()
    try:
        runner = TargetKVRunner(engine)
        same_tokens, kept_equal, near_ties = 0, 0, []
        for i, case in enumerate(cases(tokenizer, 20)):
            ids = case.prompt_ids
            budget = (128, 256, 512)[i % 3]
            cfg = make_approx_config("speckv", {"kv_budget": budget})
            tokens, kept, handle, report = await serve_compacted(
                engine, runner, ids, draft, cfg, f"case{i}")
            scores: list[torch.Tensor] = []
            ref_tokens, ref_kept = referee._speckv_decode(ids, draft, build_policy(cfg),
                                                          MAX_NEW, scores_out=scores)
            assert kept.shape == ref_kept.shape == (30, 3, budget)
            if torch.equal(kept, ref_kept):
                kept_equal += 1
            elif near_tie_only(kept, ref_kept, scores, cfg):
                near_ties.append(i)
            same_tokens += tokens == ref_tokens
            # the decode request holds the blocks of C + 1 tokens, not of L
            assert report["blocks_at_admission"] == -(-(budget + 1) // report["block_size"])
        print(f"kept sets: {kept_equal}/20 exact, near-ties at the cut in cases {near_ties}")
        assert kept_equal + len(near_ties) == 20, (kept_equal, near_ties)
        assert len(near_ties) <= 2, near_ties
        assert same_tokens >= 19, same_tokens

        # Baselines through the same machinery: kept sets exact.
        case = make_needle_case(tokenizer, 1800, seed=7, depth=0.3)
        for method, over in (("snapkv", {"kv_budget": 256}),
                             ("streamingllm", {"kv_budget": 200, "sink_tokens": 4})):
            cfg = make_approx_config(method, over)
            tokens, kept, _, _ = await serve_compacted(engine, runner, case.prompt_ids, [],
                                                       cfg, method)
            ref_tokens, ref_kept = referee._speckv_decode(case.prompt_ids, [],
                                                          build_policy(cfg), MAX_NEW)
            assert torch.equal(kept, ref_kept), method
            assert tokens == ref_tokens, method
    finally:
        engine.shutdown()


@pytest.mark.timeout(1200)
async def test_nothing_evicted_and_prefix_cache_hits(referee, tokenizer) -> None:
    from vllm import SamplingParams

    from specapprox_vllm.frontend.target_runner import TargetKVRunner

    draft = tokenizer.encode(FIXED_DRAFT_TEXT, add_special_tokens=False)
    engine = target_engine()
    try:
        runner = TargetKVRunner(engine)
        case = make_needle_case(tokenizer, 1400, seed=3, depth=0.6)
        ids = case.prompt_ids
        plain = await generate(engine, {"prompt_token_ids": ids},
                               SamplingParams(max_tokens=MAX_NEW, temperature=0.0), "plain")
        # C = L - 1: every key kept (re-rotated by 0), output identical to plain vLLM.
        cfg = make_approx_config("speckv", {"kv_budget": len(ids) - 1})
        tokens, kept, _, _ = await serve_compacted(engine, runner, ids, draft, cfg, "full")
        assert torch.equal(kept, torch.arange(len(ids) - 1).expand_as(kept))
        assert tokens == list(plain.outputs[0].token_ids)

        # Exact repeat: vLLM caches full blocks only, so the window rows are recomputed
        # (a hit on the earlier blocks)...
        cfg = make_approx_config("speckv", {"kv_budget": 256})
        first = await serve_compacted(engine, runner, ids, draft, cfg, "first")
        again = await serve_compacted(engine, runner, ids, draft, cfg, "again")
        assert again[2].cached_tokens > 1024 and not again[2].retried_without_prefix_cache
        assert torch.equal(first[1], again[1]) and first[0] == again[0]
        # ... also when the window reaches back over a block boundary (P + D = 11 blocks +
        # 10 tokens): the scoring request reads the cache only up to the block before its
        # first scoring row L - W - 1 (vllm_compat.cap_prefix_cache_hits), never re-scoring.
        aligned = ids[: 11 * 128 + 10 - len(draft)]
        first = await serve_compacted(engine, runner, aligned, draft, cfg, "a1")
        again = await serve_compacted(engine, runner, aligned, draft, cfg, "a2")
        assert not again[2].retried_without_prefix_cache
        assert again[2].cached_tokens == (len(aligned) - cfg.window - 1) // 128 * 128
        assert torch.equal(first[1], again[1]) and first[0] == again[0]

        # A different question on a shared 1k-token prefix: read from the prefix cache.
        other = make_needle_case(tokenizer, 600, seed=4, depth=0.5).prompt_ids
        shared = ids[:1100] + other[len(other) // 2:]
        tokens, kept, handle, _ = await serve_compacted(engine, runner, shared, draft, cfg,
                                                        "shared")
        assert handle.cached_tokens >= 1024 and not handle.retried_without_prefix_cache
        ref_tokens, ref_kept = referee._speckv_decode(shared, draft, build_policy(cfg),
                                                      MAX_NEW)
        assert torch.equal(kept, ref_kept)
        assert tokens == ref_tokens
        assert (await runner.store_info())[0]["entries"] == 0
    finally:
        engine.shutdown()

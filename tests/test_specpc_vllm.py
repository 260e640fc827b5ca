"""SpecPC inside vLLM: draft scores captured by the plugin's attention backend in a real
draft engine, against the HF referee (same model, fp32), with chunked prefill forced to split
the prompt and with prefix-cache hits (partial, and total: the server's KV connector caps the
hit before the first scoring row, so nothing is re-run)."""

from __future__ import annotations

import pytest
import torch

from specapprox_vllm.policies import build_policy, make_approx_config, specpc_select
from specapprox_vllm.tools.eval.needle import make_needle_case
from tests.conftest import require_model

pytestmark = pytest.mark.server
WINDOW, START_LAYER, BUDGET, KERNEL, NEIGHBORS = 64, 8, 512, 32, 32
CHUNK = 256  # max_num_batched_tokens: every prompt below is split into several chunks


def specpc():
    """The SpecPC policy whose hooks the draft workers run (scores do not depend on C)."""
    return build_policy(make_approx_config("specpc", {
        "prompt_budget": BUDGET, "window": WINDOW, "kernel": KERNEL, "neighbors": NEIGHBORS,
        "start_layer": START_LAYER, "weighted_query": True}))


def _engine():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from specapprox_vllm.wire import CONNECTOR_CONFIG, WORKER_EXTENSION

    # As server/engines.py starts a separate draft engine: with the KV connector.
    return AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(require_model()), dtype="float32", max_model_len=4096, enforce_eager=True,
        kv_cache_memory_bytes=1 << 30, max_num_batched_tokens=CHUNK, enable_prefix_caching=True,
        enable_chunked_prefill=True, worker_extension_cls=WORKER_EXTENSION, seed=0,
        kv_transfer_config=CONNECTOR_CONFIG))


def _check(result, ref_tokens, ref_score) -> None:
    assert result.tokens == ref_tokens
    got = result.score
    assert got.shape == ref_score.shape
    rel = ((got - ref_score).abs() / ref_score.abs().clamp_min(1e-6))
    big = ref_score > 1e-4 * ref_score.max()  # relative error is meaningless near zero
    assert rel[big].max().item() < 1e-3, rel[big].max().item()
    assert (got - ref_score).abs().max().item() < 1e-3 * ref_score.max().item()
    ours = specpc_select(got, BUDGET, WINDOW, KERNEL, NEIGHBORS)
    theirs = specpc_select(ref_score, BUDGET, WINDOW, KERNEL, NEIGHBORS)
    assert torch.equal(ours, theirs)


@pytest.mark.timeout(1500)
async def test_draft_scores_inside_vllm_equal_the_referee(referee, tokenizer) -> None:
    from specapprox_vllm.frontend.draft_runner import DraftRunner

    engine = _engine()
    runner = DraftRunner(engine)
    try:
        cases = [make_needle_case(tokenizer, n, seed=s, depth=d)
                 for n, s, d in ((600, 1, 0.3), (1500, 2, 0.6), (2900, 3, 0.5))]
        for case, lookahead in zip(cases, (1, 4, 2), strict=True):
            ids = case.prompt_ids
            res = await runner.score_prompt(ids, specpc(), lookahead, f"t{len(ids)}")
            assert not res.retried_without_prefix_cache
            tokens, ref = referee.run_draft(ids, lookahead, WINDOW, START_LAYER, True)
            _check(res, tokens, ref)

        # Partial prefix-cache hit: same haystack, another question. The cached blocks'
        # keys are read from the paged cache; the window rows are computed.
        base = cases[2].prompt_ids
        tail = tokenizer.encode(" What colour is the sky? Answer briefly.",
                                add_special_tokens=False)
        ids = base[:-80] + tail + base[-80:]
        res = await runner.score_prompt(ids, specpc(), 2, "hit")
        assert not res.retried_without_prefix_cache
        tokens, ref = referee.run_draft(ids, 2, WINDOW, START_LAYER, True)
        _check(res, tokens, ref)

        # The same prompt again (the next turn of a conversation): the hit stops at the block
        # before the first window row, whose queries are computed; no second draft run.
        res = await runner.score_prompt(ids, specpc(), 2, "repeat")
        assert not res.retried_without_prefix_cache
        block = engine.vllm_config.cache_config.block_size
        assert res.cached_tokens == (len(ids) - WINDOW) // block * block > 0
        _check(res, tokens, ref)
    finally:
        engine.shutdown()

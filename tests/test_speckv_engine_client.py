"""SpecKV through the production request path (``ApproxEngineClient`` + draft scheduler +
handlers) on a target engine with a tiny KV pool (32-token blocks), which is also its own
draft engine: forced preemption of compacted decode requests, engine-side KV accounting,
and no leak after 50 mixed requests of every method.

Independent expectations: each request served alone (nothing preempted) for the forced run;
block counts computed from ``C`` for the accounting; the idle pool seen by a probe before
any traffic for the leak check.
"""

from __future__ import annotations

import asyncio

import pytest

from specapprox_vllm.policies import build_policy, make_approx_config
from specapprox_vllm.tools.eval.needle import make_needle_case
from tests.test_speckv_vllm import generate, target_engine

pytestmark = pytest.mark.server
BLOCK, POOL = 32, 24


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


async def serve(client, ids: list[int], cfg, params, rid: str):
    from server.engine_client import CURRENT_REQUEST, RequestApprox

    ctx = RequestApprox(cfg)
    token = CURRENT_REQUEST.set(ctx)
    try:
        final = None
        async for out in client.generate({"prompt_token_ids": ids}, params, rid):
            final = out
    finally:
        CURRENT_REQUEST.reset(token)
    assert final is not None and final.finished
    assert final.prompt_token_ids == ids  # the user's prompt, not the decode request's
    return list(final.outputs[0].token_ids), ctx.stats[0]


async def probe(engine, runner, ids: list[int]) -> dict:
    """A lone compacted request, by hand: the engine's report at its admission."""
    from vllm import SamplingParams

    cfg = make_approx_config("snapkv", {"kv_budget": 64, "window": 16})
    handle = await runner.compact(ids, [], build_policy(cfg), "probe")
    dids, params, salt = runner.decode_request(handle, ids, SamplingParams(max_tokens=2))
    out = await generate(engine, {"prompt_token_ids": dids, "cache_salt": salt}, params,
                         f"probe-{handle.key}")
    return out.kv_transfer_params["specapprox"]


@pytest.mark.timeout(1800)
async def test_preemption_accounting_and_no_leak(tokenizer) -> None:
    from vllm import SamplingParams

    from server.engine_client import ApproxEngineClient
    from specapprox_vllm.frontend.pipeline import build_scheduler
    from specapprox_vllm.frontend.target_runner import TargetKVRunner

    engine = target_engine(block_size=BLOCK, num_gpu_blocks_override=POOL,
                           max_num_batched_tokens=256, max_num_seqs=8, max_model_len=704)
    try:
        scheduler = build_scheduler(engine, engine)  # the target drafts for itself
        client = ApproxEngineClient(engine, scheduler, make_approx_config("none"), engine)
        runner = TargetKVRunner(engine)
        prompts = [make_needle_case(tokenizer, 230, seed=s, depth=0.5).prompt_ids
                   for s in range(5)]

        idle = await probe(engine, runner, prompts[0])
        assert idle["blocks_at_admission"] == cdiv(64 + 1, BLOCK)
        # every other block is free: the pool minus vLLM's null block minus C + 1 tokens'
        assert idle["free_blocks_after_admission"] == POOL - 1 - cdiv(64 + 1, BLOCK)

        cfg = make_approx_config("speckv", {"kv_budget": 64, "window": 16, "lookahead": 8})
        params = SamplingParams(max_tokens=160, temperature=0.0, ignore_eos=True)
        alone = [await serve(client, ids, cfg, params, f"alone{i}")
                 for i, ids in enumerate(prompts)]
        for ids, (tokens, stats) in zip(prompts, alone, strict=True):
            assert stats.kv_blocks_before == cdiv(len(ids), BLOCK)
            assert stats.applied and stats.kv_entries_kept == 64 and stats.kv_loads == 1
            assert stats.kv_blocks_after == cdiv(64 + 1, BLOCK)
            assert len(tokens) == 160
        # Five at once cannot fit (each decode grows to 7 blocks): vLLM preempts some.
        together = await asyncio.gather(*[serve(client, ids, cfg, params, f"forced{i}")
                                          for i, ids in enumerate(prompts)])
        assert max(stats.kv_loads for _, stats in together) >= 2, "nothing was preempted"
        assert [t for t, _ in together] == [t for t, _ in alone]

        # 50 mixed requests, 6 at a time, then the pool and the side store are idle again.
        methods = [("none", {}), ("speckv", {"kv_budget": 64, "window": 16, "lookahead": 4}),
                   ("snapkv", {"kv_budget": 64, "window": 16}),
                   ("streamingllm", {"kv_budget": 64}),
                   ("specpc", {"prompt_budget": 128, "window": 16, "kernel": 8,
                               "neighbors": 8}),
                   ("speckv_pc", {"prompt_budget": 160, "pc_window": 16, "pc_kernel": 8,
                                  "neighbors": 8, "kv_budget": 64, "window": 16,
                                  "lookahead": 4})]
        gate = asyncio.Semaphore(6)
        short = SamplingParams(max_tokens=8, temperature=0.0)

        async def one(i: int):
            method, over = methods[i % len(methods)]
            async with gate:
                ids = make_needle_case(tokenizer, 180 + 7 * i, seed=50 + i).prompt_ids
                return await serve(client, ids, make_approx_config(method, over), short,
                                   f"mixed{i}")

        mixed = await asyncio.gather(*[one(i) for i in range(50)])
        assert all(len(t) >= 1 for t, _ in mixed)
        assert sum(s.applied for _, s in mixed) >= 40
        assert (await runner.store_info())[0]["entries"] == 0
        assert await probe(engine, runner, prompts[0]) == idle
    finally:
        engine.shutdown()


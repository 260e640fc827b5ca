"""Self-draft inside vLLM (ALGORITHMS.md, "Self-draft"), against the HF referee.

The target is its own draft: a SpecKV request is served by one target request for the
answer's first ``n + 1`` tokens (streamed; the workers compact when ``D[n-1]`` is fed), then a
decode request that continues after them from the compacted KV. Checked through the engine
client that vLLM's OpenAI code calls, on a target engine with chunked prefill forced to split
every prompt and prefix caching on:

* the first ``n + 1`` tokens equal full attention's (they are the exact answer), the kept
  (layer, KV head, position) sets equal the referee's with ``D`` = those tokens (up to stated
  near-ties at the cut), and the rest equals the referee's decoding from the compacted cache;
* streamed (DELTA) and final-only outputs agree; a prompt whose scoring rows are prefix-cache
  hits is scored again without the cache; an answer within the lookahead is full attention;
* preemption during the lookahead phase (a pool too small for the requests' growth) changes
  no token, and an abort during it leaves no stored KV and no held block.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from specapprox_vllm.policies import build_policy, make_approx_config
from specapprox_vllm.tools.eval.needle import make_needle_case
from tests.test_speckv_engine_client import probe
from tests.test_speckv_vllm import generate, near_tie_only, target_engine

pytestmark = pytest.mark.server
N, MAX_NEW = 8, 32


def self_draft_client(engine):
    """The engine client of a one-model server, recording each request's second plan."""
    from server.engine_client import ApproxEngineClient
    from specapprox_vllm.frontend.pipeline import build_scheduler

    scheduler = build_scheduler(engine, None, self_draft=True, want_indices=True)
    client = ApproxEngineClient(engine, scheduler, make_approx_config("none"), None)
    client.plans = {}
    plan = scheduler.plan

    async def recording(ids, params, cfg, rid, **kw):
        p = await plan(ids, params, cfg, rid, **kw)
        if p.lookahead is not None:
            resume = p.lookahead.resume

            async def resumed(first, tokens):
                rest = await resume(first, tokens)
                client.plans[rid] = rest
                return rest

            p.lookahead.resume = resumed
        return p

    scheduler.plan = recording
    return client


async def serve(client, ids, cfg, params, rid: str):
    """(tokens, usage stats, kept [layers, H_kv, C] or None, outputs seen by the client)."""
    from server.engine_client import CURRENT_REQUEST, RequestApprox

    ctx = RequestApprox(cfg)
    token = CURRENT_REQUEST.set(ctx)
    outs = []
    try:
        async for out in client.generate({"prompt_token_ids": ids}, params, rid):
            outs.append((list(out.outputs[0].token_ids), out.outputs[0].text, out.finished))
    finally:
        CURRENT_REQUEST.reset(token)
    assert outs and outs[-1][2] and not any(f for _, _, f in outs[:-1])
    kept = None
    rest = client.plans.get(rid)
    if rest is not None:
        idx = rest.extra["kv_indices"]
        kept = torch.tensor([idx[f"model.layers.{i}.self_attn.attn"] for i in range(len(idx))])
    return outs[-1][0], ctx.stats[0], kept, outs


@pytest.mark.timeout(2400)
async def test_self_draft_equals_the_referee(referee, tokenizer) -> None:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from specapprox_vllm.frontend.target_runner import TargetKVRunner

    engine = target_engine()
    try:
        client = self_draft_client(engine)
        greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
        lengths = (1200, 1700, 2200, 2600)
        exact, near, same_tail = 0, [], 0
        for i, length in enumerate(lengths):
            ids = make_needle_case(tokenizer, length, seed=300 + i, depth=0.25 * i).prompt_ids
            cfg = make_approx_config("speckv", {"kv_budget": (128, 256)[i % 2], "lookahead": N})
            plain = await generate(engine, {"prompt_token_ids": ids}, greedy, f"plain{i}")
            tokens, stats, kept, _ = await serve(client, ids, cfg, greedy, f"sd{i}")
            assert tokens[: N + 1] == list(plain.outputs[0].token_ids)[: N + 1]
            assert stats.lookahead_source == "self" and stats.applied
            assert stats.draft_tokens == N and stats.kv_entries_kept == cfg.kv_budget
            assert stats.prompt_tokens_kept == len(ids)
            scores: list[torch.Tensor] = []
            ref_tokens, ref_kept = referee.self_draft_generate(ids, build_policy(cfg), MAX_NEW,
                                                               scores)
            assert ref_tokens[: N + 1] == tokens[: N + 1]
            if torch.equal(kept, ref_kept):
                exact += 1
            else:
                assert near_tie_only(kept, ref_kept, scores, cfg), f"case {i}"
                near.append(i)
            same_tail += tokens == ref_tokens
        print(f"self-draft kept sets: {exact}/{len(lengths)} exact, near-ties in {near}")
        assert len(near) <= 1 and same_tail >= len(lengths) - 1, (near, same_tail)

        # Streamed deltas add up to the final-only answer.
        ids = make_needle_case(tokenizer, 1500, seed=310).prompt_ids
        cfg = make_approx_config("speckv", {"kv_budget": 128, "lookahead": N})
        final, _, _, _ = await serve(client, ids, cfg, greedy, "final")
        delta = SamplingParams(max_tokens=MAX_NEW, temperature=0.0,
                               output_kind=RequestOutputKind.DELTA)
        _, _, _, outs = await serve(client, ids, cfg, delta, "delta")
        assert [t for toks, _, _ in outs for t in toks] == final
        assert len(outs) > 2  # the lookahead's tokens came before the continuation's

        # An exact repeat whose scoring rows reach back into cached full blocks: the target
        # reads the cache only up to the block before the first scoring row (L - W - 1), so
        # the lookahead scores them itself; no second prefill without the cache.
        aligned = ids[: 11 * 128 + 10]
        first, _, kept1, _ = await serve(client, aligned, cfg, greedy, "a1")
        again, _, kept2, _ = await serve(client, aligned, cfg, greedy, "a2")
        assert not client.plans["a2"].extra["kv_retried"]
        assert client.plans["a2"].cached_tokens == (len(aligned) - cfg.window - 1) // 128 * 128
        assert again == first and torch.equal(kept1, kept2)

        # An answer that fits in the lookahead is full attention.
        short = SamplingParams(max_tokens=N + 1, temperature=0.0)
        tokens, stats, kept, _ = await serve(client, ids, cfg, short, "short")
        assert kept is None and not stats.applied and stats.reason == "answer_within_lookahead"
        plain = await generate(engine, {"prompt_token_ids": ids}, short, "plain-short")
        assert tokens == list(plain.outputs[0].token_ids)
        assert (await TargetKVRunner(engine).store_info())[0]["entries"] == 0
    finally:
        engine.shutdown()


@pytest.mark.timeout(1800)
async def test_preemption_and_abort_during_the_lookahead(tokenizer) -> None:
    """Four prompts of 314-325 tokens take 10-11 blocks of 32 (the first block, the chat
    template's, is shared through the prefix cache); a lookahead of 64 grows each by two
    blocks. With 22 usable blocks two requests are admitted (21 blocks), and the second one's
    growth preempts it while the first is still in its lookahead (its compactor sees it
    computed again from an earlier position)."""
    from vllm import SamplingParams

    from specapprox_vllm.frontend.target_runner import TargetKVRunner

    engine = target_engine(block_size=32, num_gpu_blocks_override=23,
                           max_num_batched_tokens=256, max_num_seqs=8, max_model_len=704)
    try:
        client = self_draft_client(engine)
        runner = TargetKVRunner(engine)
        prompts = [make_needle_case(tokenizer, 230, seed=s, depth=0.5).prompt_ids
                   for s in range(4)]
        assert [len(p) for p in prompts] == [325, 322, 314, 316]
        idle = await probe(engine, runner, prompts[0])
        cfg = make_approx_config("speckv", {"kv_budget": 64, "window": 16, "lookahead": 64})
        params = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
        alone = [(await serve(client, ids, cfg, params, f"alone{i}"))[0]
                 for i, ids in enumerate(prompts)]
        together = await asyncio.gather(*[serve(client, ids, cfg, params, f"together{i}")
                                          for i, ids in enumerate(prompts)])
        assert [t for t, _, _, _ in together] == alone
        assert all(len(t) == 120 for t in alone)
        assert any(client.plans[f"together{i}"].extra["kv_recomputed"]
                   for i in range(len(prompts))), "no lookahead was preempted"

        # Abort during the lookahead: the client goes away after the first tokens, which
        # cancels the task serving it (as vLLM's server does on a disconnect).
        started = asyncio.Event()

        async def consume() -> None:
            from server.engine_client import CURRENT_REQUEST, RequestApprox

            CURRENT_REQUEST.set(RequestApprox(cfg))
            async for _ in client.generate({"prompt_token_ids": prompts[1]}, params, "gone"):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 600)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert "gone" not in client.plans  # it never reached the continuation
        await asyncio.sleep(1.0)
        assert (await runner.store_info())[0]["entries"] == 0
        assert await probe(engine, runner, prompts[0]) == idle
    finally:
        engine.shutdown()

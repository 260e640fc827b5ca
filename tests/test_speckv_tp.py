"""SpecKV with tensor parallelism 2 on CPU: each rank scores, selects and stores only its own
KV heads, and its connector writes only those. A tiny random Llama (2 KV heads, one per rank)
keeps it affordable on two cores; SmolLM2's 3 KV heads cannot be split in two.

Expectations: the kept sets gathered from both ranks (rank order = head order) equal the HF
referee's; with ``C = L - 1`` the output equals plain vLLM with the same TP engine.
"""

from __future__ import annotations

import os

import pytest
import torch

from specapprox_vllm.policies import build_policy, make_approx_config
from tests.test_speckv_vllm import generate, serve_compacted, target_engine

pytestmark = [
    pytest.mark.server,
    # Opt-in: alone it passes in ~40 s, but in one full CI run (heavy load, other engines
    # alive) rank 0's worker never finished starting and the test hung until its timeout;
    # the cause is not diagnosed yet (docs/speckv.md, "Tensor parallelism").
    pytest.mark.skipif(os.environ.get("SPECAPPROX_TP_TEST") != "1",
                       reason="TP=2 engine test is opt-in: set SPECAPPROX_TP_TEST=1"),
]


@pytest.mark.timeout(900)
async def test_tp2_ranks_compact_their_own_heads(tiny_llama_dir, monkeypatch) -> None:
    from referee import Referee
    from vllm import SamplingParams

    from specapprox_vllm.frontend.target_runner import TargetKVRunner

    # vLLM's CPU workers bind threads per NUMA node by default; this box has one node.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    engine = target_engine(model=str(tiny_llama_dir), tensor_parallel_size=2,
                           max_model_len=2048, kv_cache_memory_bytes=1 << 28)
    try:
        runner = TargetKVRunner(engine)
        ids = torch.randint(100, 20000, (700,), generator=torch.Generator().manual_seed(0))
        ids = ids.tolist()
        draft = [5, 6, 7, 8]
        plain = await generate(engine, {"prompt_token_ids": ids},
                               SamplingParams(max_tokens=16, temperature=0.0), "plain")
        cfg = make_approx_config("speckv", {"kv_budget": len(ids) - 1, "window": 16})
        tokens, kept, _, _ = await serve_compacted(engine, runner, ids, draft, cfg, "full", 16)
        assert kept.shape == (2, 2, len(ids) - 1)
        assert tokens == list(plain.outputs[0].token_ids)

        referee = Referee(str(tiny_llama_dir))
        for budget in (128, 300):
            cfg = make_approx_config("speckv", {"kv_budget": budget, "window": 16})
            tokens, kept, _, _ = await serve_compacted(engine, runner, ids, draft, cfg,
                                                       f"c{budget}", 16)
            ref_tokens, ref_kept = referee._speckv_decode(ids, draft, build_policy(cfg), 16)
            assert torch.equal(kept, ref_kept)
            assert tokens == ref_tokens
        assert [s["entries"] for s in await runner.store_info()] == [0, 0]
    finally:
        engine.shutdown()

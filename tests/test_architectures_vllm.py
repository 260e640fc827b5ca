"""The served path beyond SmolLM2 (issue 19): tiny random Qwen2 and Llama-3-style models, built
here from a config with SmolLM2's tokenizer, through a real vLLM engine against the HF referee
on the same weights (fp32), and the start-up refusal of what KV compaction cannot serve.

* ``vllm_qwen2``: q/k/v biases, GQA 6 (12 query heads, 2 KV heads), rope_theta 1e6, untied
  embeddings (Qwen2.5's traits). Head size 32: the smallest vLLM's CPU attention takes.
* ``vllm_llama3``: ``llama3`` RoPE scaling (with an original context of 256, so that the
  scaled frequencies matter at these lengths), GQA 4, rope_theta 5e5.

SpecKV: the kept (layer, KV head, position) sets computed inside vLLM's paged cache, through
chunked prefill, equal the referee's for a fixed lookahead ``D`` (up to near-ties at the cut,
the tolerance of test_speckv_vllm.py). SpecPC: the draft scores captured in the engine equal
the referee's within 1e-3 relative, and select the same prompt tokens.

The refusal: a Qwen2 with sliding-window layers and YaRN RoPE makes ``specapprox-serve``
exit with status 2 at start-up, naming both reasons, before any request.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specapprox_vllm.policies import build_policy, make_approx_config, specpc_select
from tests.conftest import ROOT
from tests.test_speckv_vllm import generate, near_tie_only, target_engine

pytestmark = pytest.mark.server
COMMON = dict(num_hidden_layers=3, intermediate_size=256, max_position_embeddings=4096,
              initializer_range=0.2,  # peaky attention: selections are not near-ties
              torch_dtype="float32")
SHAPES = {
    "qwen2": dict(hidden_size=384, num_attention_heads=12, num_key_value_heads=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  tie_word_embeddings=False),
    "llama3": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 256},
                   tie_word_embeddings=True),
}
LENGTHS_BUDGETS = ((700, 64), (1300, 128), (2100, 256))
N_DRAFT = 8
WINDOW, START_LAYER = 32, 1


def make_model(kind: str, out: Path, tokenizer_dir: Path, **extra) -> Path:
    """A random fp32 model of ``kind`` (``qwen2`` or ``llama``-family) with SmolLM2's
    tokenizer, saved as an HF folder vLLM and the referee both load."""
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    conf_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if kind.startswith("qwen2") else \
        (LlamaConfig, LlamaForCausalLM)
    shape = {**COMMON, **SHAPES["qwen2" if kind.startswith("qwen2") else "llama3"], **extra}
    cfg = conf_cls(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                   eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _prompt(length: int, seed: int, vocab: int = 49152) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (length,), generator=g).tolist()


@pytest.fixture(scope="module", params=["qwen2", "llama3"])
def arch(request, tmp_path_factory, smollm2_dir):
    from referee import Referee

    path = make_model(request.param, tmp_path_factory.mktemp(request.param), smollm2_dir)
    return request.param, path, Referee(str(path), dtype=torch.float32)


@pytest.mark.timeout(1200)
async def test_vllm_qwen2_and_vllm_llama3_speckv_and_specpc_equal_the_referee(arch) -> None:
    from vllm import SamplingParams

    from specapprox_vllm.frontend.draft_runner import DraftRunner
    from specapprox_vllm.frontend.target_runner import TargetKVRunner

    kind, path, referee = arch
    engine = target_engine(model=str(path), max_model_len=4096)
    try:
        runner = TargetKVRunner(engine)
        exact, near = 0, []
        for i, (length, budget) in enumerate(LENGTHS_BUDGETS):
            ids, draft = _prompt(length, seed=10 + i), _prompt(N_DRAFT, seed=90 + i)
            cfg = make_approx_config("speckv", {"kv_budget": budget})
            handle = await runner.compact(ids, draft, build_policy(cfg), f"{kind}{i}",
                                          want_indices=True)
            dids, params, salt = runner.decode_request(
                handle, ids, SamplingParams(max_tokens=4, temperature=0.0))
            out = await generate(engine, {"prompt_token_ids": dids, "cache_salt": salt},
                                 params, f"{kind}{i}-decode")
            await runner.drop(handle.key)
            assert len(out.outputs[0].token_ids) == 4
            kept = torch.tensor([handle.indices[f"model.layers.{j}.self_attn.attn"]
                                 for j in range(len(handle.indices))])
            scores: list[torch.Tensor] = []
            _, ref_kept = referee._speckv_decode(ids, draft, build_policy(cfg), 1,
                                                 scores_out=scores)
            assert kept.shape == ref_kept.shape == (3, 2, budget), (kept.shape, ref_kept.shape)
            if torch.equal(kept, ref_kept):
                exact += 1
            else:
                assert near_tie_only(kept, ref_kept, scores, cfg), (kind, i)
                near.append(i)
        print(f"{kind} speckv: {exact}/{len(LENGTHS_BUDGETS)} kept sets exact, near-ties {near}")
        assert exact >= len(LENGTHS_BUDGETS) - 1, (kind, near)

        policy = build_policy(make_approx_config("specpc", {
            "prompt_budget": 256, "window": WINDOW, "kernel": 8, "neighbors": 8,
            "start_layer": START_LAYER, "weighted_query": True}))
        draft_runner = DraftRunner(engine)
        for i, (length, lookahead) in enumerate(((900, 1), (1700, 3))):
            ids = _prompt(length, seed=50 + i)
            res = await draft_runner.score_prompt(ids, policy, lookahead, f"{kind}pc{i}")
            tokens, ref = referee.run_draft(ids, lookahead, WINDOW, START_LAYER, True)
            assert res.tokens == tokens, kind
            # fp32 scores summed in another order: 1e-3 of the largest score, absolute
            err = (res.score - ref).abs().max().item() / ref.max().item()
            print(f"{kind} specpc L={length}: max |score - referee| = {err:.1e} x max score")
            assert err < 1e-3, (kind, err)
            assert torch.equal(specpc_select(res.score, 256, WINDOW, 8, 8),
                               specpc_select(ref, 256, WINDOW, 8, 8)), kind
    finally:
        engine.shutdown()


@pytest.mark.timeout(600)
def test_unsupported_attention_is_refused_at_startup(tmp_path, smollm2_dir) -> None:
    """Sliding-window layers and a RoPE that re-rotation cannot reproduce (YaRN scales its
    cos/sin cache) stop the server at start-up, with both reasons named."""
    path = make_model("qwen2-sliding-yarn", tmp_path / "m", smollm2_dir,
                      use_sliding_window=True, sliding_window=64, max_window_layers=0,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                       "original_max_position_embeddings": 1024})
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "--config", str(ROOT / "configs/default.yaml"),
         "--target.model", str(path), "--target.max_model_len", "2048",
         "--target.kv_cache_memory_gib", "0.1", "--server.served_model_name", "tiny",
         "--port", "0"], capture_output=True, text=True, timeout=540, cwd=ROOT)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    err = proc.stderr
    assert "cannot be served by KV compaction" in err and str(path) in err, err[-3000:]
    assert "sliding window (64 tokens)" in err, err[-3000:]
    assert "YaRN" in err, err[-3000:]

"""The whole app in-process on a tiny random Llama: vLLM's OpenAI serving code, our engine
client and middleware, a real vLLM engine. Reference: HF transformers greedy decoding of the
same weights, compared up to the first step where the top-2 logits are too close to call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.config import load_config
from tests.conftest import ROOT

MAX_TOKENS = 12


def hf_greedy(model_dir: Path, prompt_ids: list[int]) -> tuple[list[int], int]:
    """Greedy tokens and the number of leading steps whose top-1/top-2 gap is > 1e-3."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    safe = 0
    for scores in out.scores:
        top2 = scores[0].float().topk(2).values
        if (top2[0] - top2[1]).item() < 1e-3:
            break
        safe += 1
    return tokens, safe


@pytest.mark.timeout(600)
async def test_tiny_llama_through_the_app_matches_hf(tiny_llama_dir: Path) -> None:
    # One event loop for engine, app and client: AsyncLLM binds its output handler to the
    # loop that first uses it.
    import httpx
    from vllm.engine.arg_utils import AsyncEngineArgs

    from server.app import build_server_app
    from server.engines import start_engine, vllm_server_args

    cfg = load_config(ROOT / "configs" / "default.yaml", {
        "target.model": str(tiny_llama_dir), "target.max_model_len": 512,
        "target.kv_cache_memory_gib": 0.1, "server.served_model_name": "tiny"}, environ={})
    vllm_args = vllm_server_args(cfg)
    target = start_engine(AsyncEngineArgs.from_cli_args(vllm_args), "target")
    prompt_ids = list(range(100, 140))
    try:
        app = (await build_server_app(cfg, vllm_args, target)).asgi
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t", timeout=120) as http:
            r = await http.post("/v1/completions", json={
                "model": "tiny", "prompt": prompt_ids, "max_tokens": MAX_TOKENS,
                "temperature": 0, "return_token_ids": True})
            assert r.status_code == 200, r.text
            body = r.json()
            tokens = body["choices"][0]["token_ids"]
            assert body["usage"]["prompt_tokens"] == len(prompt_ids)
            assert body["usage"]["approx"]["method"] == "none"
            r = await http.post("/v1/completions", json={"model": "tiny", "prompt": "x",
                                                         "approx": {"method": "speckv"}})
            assert r.status_code == 400 and "not available" in r.json()["error"]["message"]
            assert (await http.get("/health")).status_code == 200
    finally:
        target.shutdown()
    ref, safe = hf_greedy(tiny_llama_dir, prompt_ids)
    assert safe >= 3, "random model too tied to compare"
    assert tokens[:safe] == ref[:safe]

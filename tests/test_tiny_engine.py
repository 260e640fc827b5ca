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


def greedy(model, prompt_ids: list[int], n: int, **gen) -> tuple[list[int], int]:
    """HF greedy ``generate`` (logits processors from the model's generation_config, unless
    ``gen`` overrides them) and the number of leading steps whose processed top-1/top-2 gap
    is > 1e-3 (the steps two implementations can be compared on)."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, **gen)
    safe = 0
    for scores in out.scores:
        top2 = scores[0].float().topk(2).values
        if (top2[0] - top2[1]).item() < 1e-3:
            break
        safe += 1
    return out.sequences[0, len(prompt_ids):].tolist(), safe


def hf_greedy(model_dir: Path, prompt_ids: list[int]) -> tuple[list[int], int]:
    """Greedy tokens of the model in ``model_dir`` and its comparable leading steps."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return greedy(model, prompt_ids, MAX_TOKENS)


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


@pytest.mark.timeout(600)
async def test_draft_generation_config_penalty_applied_as_hf_generate(tmp_path, smollm2_dir
                                                                        ) -> None:
    """A draft checkpoint whose generation_config.json sets ``repetition_penalty`` (SmolLM2's
    weights, linked, with a penalty of 1.8 added) drafts as the reference's HF draft does
    (``generate`` applies the checkpoint's penalty), for plain lookaheads and scored ones;
    without the penalty the draft repeats itself, so the check has teeth."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from specapprox_vllm.frontend.draft_runner import DraftRunner
    from specapprox_vllm.policies import build_policy, make_approx_config
    from specapprox_vllm.wire import WORKER_EXTENSION

    path = tmp_path / "smollm2-penalty"
    path.mkdir()
    for f in smollm2_dir.iterdir():
        if f.is_file() and not f.name.startswith("specapprox_"):
            (path / f.name).symlink_to(f.resolve())
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    (path / "generation_config.json").unlink()
    (path / "generation_config.json").write_text(json.dumps({**gen, "repetition_penalty": 1.8}))
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.encode("red green blue red green blue red green blue red green blue red green")
    n = 12

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert hf.generation_config.repetition_penalty == 1.8
    want, safe = greedy(hf, prompt, n)
    plain, _ = greedy(hf, prompt, n, repetition_penalty=1.0)
    assert safe >= 6, "too close to call"
    assert plain[:safe] != want[:safe], "the penalty changes nothing here: no teeth"

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(path), dtype="float32", max_model_len=512, enforce_eager=True,
        kv_cache_memory_bytes=1 << 28, worker_extension_cls=WORKER_EXTENSION, seed=0))
    try:
        runner = DraftRunner(engine)
        assert runner.sampling_defaults == {"repetition_penalty": 1.8}
        got = (await runner.generate(prompt, n, "la")).tokens
        assert got[:safe] == want[:safe], (tok.decode(got), tok.decode(want), safe)
        policy = build_policy(make_approx_config("specpc", {
            "prompt_budget": 8, "window": 2, "kernel": 3, "neighbors": 1, "start_layer": 0}))
        scored = await runner.score_prompt(prompt, policy, n, "pc")
        assert scored.tokens[:safe] == want[:safe], (tok.decode(scored.tokens), safe)
    finally:
        engine.shutdown()

"""Shared fixtures: the embedded model, tiny random models, and a real server process.

Tests that need the embedded SmolLM2 skip when it is missing, unless
``SPECAPPROX_REQUIRE_MODEL=1`` (set by ``scripts/test.sh`` and CI), where they fail instead:
CI must never pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"


def require_model() -> Path:
    if (SMOLLM2_DIR / "config.json").is_file():
        return SMOLLM2_DIR
    msg = f"embedded model missing at {SMOLLM2_DIR} (run scripts/setup.sh)"
    if os.environ.get("SPECAPPROX_REQUIRE_MODEL") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return require_model()


@pytest.fixture(scope="session")
def live_server():
    """One real ``specapprox-serve`` (default config: SmolLM2 target and draft) shared by every
    module that talks HTTP to it; a start costs over a minute here. Tests that use it measure
    deltas, never absolute counters, since other modules use the same server."""
    from tests.server_utils import ServerProcess

    require_model()
    srv = ServerProcess().start()
    yield srv
    srv.stop()


def make_tiny_llama(out: Path, tokenizer_dir: Path, layers: int = 2, seed: int = 0,
                    initializer_range: float = 0.02) -> Path:
    """A random fp32 Llama with SmolLM2's tokenizer, saved as an HF folder vLLM can load
    (a larger ``initializer_range`` gives peakier logits: fewer near-ties to compare)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
        torch_dtype="float32", initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


# HTTP fixtures shared by the modules that talk to ``live_server`` with the openai SDK.
@pytest.fixture(scope="module")
def server(live_server):
    return live_server


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0,
                         timeout=600)


@pytest.fixture(scope="module")
def needle():
    """A 3k-token needle-in-a-haystack chat prompt (SmolLM2 answers it with full KV)."""
    from transformers import AutoTokenizer

    from specapprox_vllm.tools.eval.needle import make_needle_case

    return make_needle_case(AutoTokenizer.from_pretrained(require_model()), 3000, seed=11,
                            depth=0.5)


@pytest.fixture(scope="module")
def referee():
    """The HF referee on the embedded model, fp32 (the exactness setting)."""
    import torch
    from referee import Referee

    return Referee(str(require_model()), dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(require_model())

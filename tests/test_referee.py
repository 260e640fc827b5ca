"""The HF referee: plumbing checked against independent computations, then SmolLM2 checks.

Tiny random Llama / Qwen2 models (built here from a config, no weights downloaded):

* every method with a budget >= L reproduces full attention, and the KV methods also at
  ``L = C + 1`` (nothing dropped, ``P[L-1]`` re-fed at its position);
* full attention equals HF ``model.generate`` greedy;
* KV compaction (gathered per-head cache, original rotary positions) equals decoding over the
  uncompressed cache with the dropped keys masked out per layer and KV head;
* SpecKV's kept sets equal the selection recomputed from HF's own ``output_attentions``;
* SpecPC's step-wise draft scores equal the single-prefill formulation of ALGORITHMS.md;
* the draft stops at EOS.

SmolLM2-135M-Instruct (``@pytest.mark.model``; skipped without the model folder unless
``SPECAPPROX_REQUIRE_MODEL=1``, then failed): the same equivalences, and a ~2k-token needle
prompt that SpecKV (self-draft, C = 256) answers while StreamingLLM at the same budget does not.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from referee import Referee
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from specapprox_vllm.policies import METHODS, pool1d, speckv_select
from specapprox_vllm.tools.eval import make_needle_case

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"

# budgets that make each method a no-op for a prompt of length L (first) and, for the KV
# methods, the "nothing dropped" case L = C + 1 (second)
SMALL = {"window": 4}


def _noop_cfg(method: str, length: int) -> dict:
    return {
        "none": {},
        "speckv": {"kv_budget": length, **SMALL},
        "snapkv": {"kv_budget": length, **SMALL},
        "streamingllm": {"kv_budget": length},
        "specpc": {"prompt_budget": length, **SMALL, "start_layer": 0},
        "speckv_pc": {"prompt_budget": length, "pc_window": 4, "kv_budget": length, **SMALL},
    }[method]


def _tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=101,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,  # peaky attention and logits: greedy paths are not near-ties
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(head_dim=16, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.set_attn_implementation("eager")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request: pytest.FixtureRequest) -> Referee:
    return Referee(_tiny(request.param))


def _prompt(length: int, seed: int = 1, vocab: int = 101) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


# ---------------------------------------------------------------- independent references


@contextlib.contextmanager
def _eager_with(fn) -> Iterator[None]:
    ALL_ATTENTION_FUNCTIONS["eager"] = fn
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS["eager"]


@torch.no_grad()
def masked_decode(model, prompt: list[int], kept: torch.Tensor, max_new: int) -> list[int]:
    """Decode over the *uncompressed* cache of ``P[:L-1]``, hiding dropped prompt keys.

    ``kept`` is ``[layers, H_kv, C]``. Each layer adds a ``-inf`` mask per query head on the
    prompt keys its KV head dropped; keys of ``P[L-1]`` and later tokens stay visible.
    """
    length = len(prompt)
    cfg = model.config
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    eager = sys.modules[type(model).__module__].eager_attention_forward
    cache = DynamicCache()
    model(input_ids=torch.tensor([prompt[:-1]]), past_key_values=cache, use_cache=True)

    def attention(module, query, key, value, attention_mask, **kw):
        s = key.shape[2]
        allow = torch.ones(cfg.num_key_value_heads, s, dtype=torch.bool)
        allow[:, : length - 1] = False
        allow.scatter_(1, kept[module.layer_idx], True)
        mask = torch.zeros(1, cfg.num_attention_heads, query.shape[2], s)
        mask.masked_fill_(~allow.repeat_interleave(g, 0)[None, :, None, :], float("-inf"))
        return eager(module, query, key, value, mask, **kw)

    out, tok = [], prompt[-1]
    with _eager_with(attention):
        for _ in range(max_new):
            logits = model(input_ids=torch.tensor([[tok]]), past_key_values=cache).logits
            tok = int(logits[0, -1].argmax())
            out.append(tok)
    return out


# ---------------------------------------------------------------- tiny models


@pytest.mark.parametrize("method", METHODS)
def test_budget_at_least_prompt_is_full_attention(tiny: Referee, method: str) -> None:
    prompt = _prompt(40)
    full = tiny.full_generate(prompt, 12)
    res = tiny.generate(prompt, method, _noop_cfg(method, len(prompt)), 12)
    assert res.tokens == full
    assert not res.applied and res.kept_kv is None and res.kept_prompt_idx is None


@pytest.mark.parametrize("method", ["speckv", "snapkv", "streamingllm", "speckv_pc"])
def test_budget_prompt_minus_one_keeps_everything(tiny: Referee, method: str) -> None:
    prompt = _prompt(60, seed=2)
    cfg = _noop_cfg(method, len(prompt) - 1)
    if method == "speckv_pc":
        cfg["prompt_budget"] = len(prompt)  # SpecPC stage no-op, SpecKV stage L = C + 1
    res = tiny.generate(prompt, method, cfg, 12)
    assert res.applied
    layers = tiny.target.config.num_hidden_layers
    h_kv = tiny.target.config.num_key_value_heads
    assert res.kept_kv.tolist() == [[list(range(len(prompt) - 1))] * h_kv] * layers
    assert res.tokens == tiny.full_generate(prompt, 12)


def test_full_attention_equals_hf_generate(tiny: Referee) -> None:
    for seed in range(3):
        prompt = _prompt(30 + 17 * seed, seed=seed)
        hf = tiny.target.generate(torch.tensor([prompt]), max_new_tokens=15, do_sample=False)
        assert tiny.full_generate(prompt, 15) == hf[0, len(prompt) :].tolist()


@pytest.mark.parametrize("method", ["speckv", "snapkv", "streamingllm", "speckv_pc"])
def test_kv_compaction_equals_masking(tiny: Referee, method: str) -> None:
    prompt = _prompt(90, seed=3)
    cfg = {"kv_budget": 24, **({} if method == "streamingllm" else SMALL)}
    if method == "speckv_pc":
        cfg.update(prompt_budget=200, pc_window=4, lookahead=5)
    res = tiny.generate(prompt, method, cfg, 10)
    assert res.kept_kv.shape == (3, 2, 24)
    assert int(res.kept_kv.max()) <= len(prompt) - 2
    # heads really differ for score-based methods (else the per-head path is untested)
    if method != "streamingllm":
        assert not torch.equal(res.kept_kv[:, 0], res.kept_kv[:, 1])
    assert res.tokens == masked_decode(tiny.target, prompt, res.kept_kv, 10)
    assert res.tokens != tiny.full_generate(prompt, 10)  # the compression mattered


@torch.no_grad()
def test_speckv_kept_sets_from_hf_attentions(tiny: Referee) -> None:
    prompt, window, budget = _prompt(80, seed=4), 4, 20
    res = tiny.generate(prompt, "speckv", {"kv_budget": budget, "window": window}, 6)
    draft = res.draft_tokens
    assert draft == tiny.full_generate(prompt, 6)  # self-draft = the target's greedy answer
    full = torch.tensor([prompt + draft])
    att = tiny.target(full, output_attentions=True).attentions  # [1, H_q, S, S] per layer
    wq, length = window + len(draft) + 1, len(prompt)
    h_kv = tiny.target.config.num_key_value_heads
    for layer, a in enumerate(att):
        rows = a[0, :, -wq:, : length - window - 1].float()  # [H_q, W', L-W-1]
        scores = rows.reshape(h_kv, -1, rows.shape[-1]).amax(dim=1)
        want = speckv_select(scores, length, budget, window, 7)
        assert torch.equal(res.kept_kv[layer], want), layer


@torch.no_grad()
def test_specpc_stepwise_scores_equal_single_prefill(tiny: Referee) -> None:
    prompt, window, n, start = _prompt(70, seed=5), 6, 4, 1
    cfg = {"prompt_budget": 30, "window": window, "lookahead": n, "start_layer": start}
    res = tiny.generate(prompt, "specpc", cfg, 5)
    assert len(res.draft_tokens) == n and res.kept_prompt_idx.numel() == 30
    seq = torch.tensor([prompt + res.draft_tokens[: n - 1]])
    att = tiny.draft.forward(seq, output_attentions=True).attentions
    length, rows = len(prompt), window + n - 1
    weight = torch.ones(rows)
    weight[:window] = torch.linspace(0, 1, window)
    per_layer = [
        (a[0, :, -rows:, :length].float() * weight[None, :, None]).amax(dim=(0, 1))
        for a in att[start:]
    ]
    torch.testing.assert_close(res.specpc_scores, torch.stack(per_layer).amax(0), rtol=1e-5, atol=0)
    # kept prompt = SpecPC selection on those scores, and the window is always kept
    assert set(range(length - window, length)) <= set(res.kept_prompt_idx.tolist())
    assert res.target_prompt_len == 30
    pooled = pool1d(res.specpc_scores, 32)
    assert int(pooled.argmax()) in res.kept_prompt_idx.tolist()


def test_draft_stops_at_eos() -> None:
    model = _tiny("llama", seed=7)
    prompt = _prompt(30, seed=7)
    seq = Referee(model).full_generate(prompt, 8)
    stop = next(i for i, t in enumerate(seq) if i >= 2 and t not in seq[:i])
    model.generation_config.eos_token_id = seq[stop]
    ref = Referee(model)
    draft, _ = ref.run_draft(prompt, 8)
    assert draft == seq[: stop + 1]
    assert ref.full_generate(prompt, 8) == seq[: stop + 1]


# ---------------------------------------------------------------- SmolLM2


def _require_model() -> None:
    if (MODEL_DIR / "config.json").is_file():
        return
    msg = f"SmolLM2 model folder missing: {MODEL_DIR} (run the model preparation step)"
    if os.environ.get("SPECAPPROX_REQUIRE_MODEL") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def smol() -> tuple[Referee, object]:
    _require_model()
    from transformers import AutoTokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return Referee(MODEL_DIR), AutoTokenizer.from_pretrained(MODEL_DIR)


def _chat(tok, text: str) -> list[int]:
    out = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.model
def test_smollm2_full_equals_hf_generate_and_noop_budgets(smol) -> None:
    ref, tok = smol
    prompt = _chat(tok, "Name three colours of the rainbow and one animal that lives in the sea.")
    full = ref.full_generate(prompt, 16)
    hf = ref.target.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    assert full == hf[0, len(prompt) :].tolist()
    for method in METHODS:
        res = ref.generate(prompt, method, _noop_cfg(method, len(prompt)), 16)
        assert res.tokens == full, method
    res = ref.generate(prompt, "speckv", {"kv_budget": len(prompt) - 1, **SMALL}, 16)
    assert res.applied and res.tokens == full


@pytest.mark.model
def test_smollm2_needle_speckv_beats_streamingllm(smol) -> None:
    ref, tok = smol
    case = make_needle_case(tok, context_tokens=2000, seed=0, depth=0.5)
    assert 1900 < len(case.prompt_ids) < 2300
    full = tok.decode(ref.full_generate(case.prompt_ids, 24))
    assert case.is_correct(full), f"full attention itself misses the needle: {full!r}"
    spec = ref.generate(case.prompt_ids, "speckv", {"kv_budget": 256}, 24)
    assert spec.kept_kv.shape == (30, 3, 256)
    spec_text = tok.decode(spec.tokens)
    assert case.is_correct(spec_text), f"SpecKV C=256 missed {case.answer}: {spec_text!r}"
    stream = ref.generate(case.prompt_ids, "streamingllm", {"kv_budget": 256}, 24)
    stream_text = tok.decode(stream.tokens)
    assert not case.is_correct(stream_text), f"StreamingLLM found the needle: {stream_text!r}"


def test_needle_cases_are_deterministic() -> None:
    a = make_needle_case(None, context_tokens=600, seed=3, depth=0.25)
    b = make_needle_case(None, context_tokens=600, seed=3, depth=0.25)
    c = make_needle_case(None, context_tokens=600, seed=4, depth=0.25)
    assert a == b and a.messages != c.messages
    content = a.messages[0]["content"]
    assert f"is {a.answer}." in content and a.key in content.split("Question:")[1]
    assert 0.15 < a.needle_char / len(content) < 0.35  # needle near the requested depth
    assert a.is_correct(f"The number is {a.answer[:3]},{a.answer[3:]}.")
    assert not a.is_correct("The number is 12.")

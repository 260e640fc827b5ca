"""Penalties of KV-compressed requests count the user's real prompt and outputs (issue 19).

A compacted request's decode request has ``C`` placeholder tokens plus ``P[L-1]`` as its
prompt (and, after a self-drafted lookahead, the answer's first tokens): vLLM's penalties would
count those. The target's logits processor (specapprox_vllm/worker/penalties.py) counts ``P``
and every output instead.

* In the engine, small ``C``: SmolLM2 needle prompts whose needle lies before the last ``C``
  tokens (so only the real prompt holds it), ``repetition_penalty`` 1.3: the served SpecKV
  tokens equal the HF referee's SpecKV with the penalty counted over ``P`` and the outputs
  (a naive implementation), and the referee shows that counting the placeholders instead
  gives other tokens (the check has teeth).
* Over HTTP, ``C = L - 1``: with a repetition penalty, and with presence and frequency
  penalties, every KV method answers token for token as full attention does. The second
  setting failed for the self-drafted methods before the fix: their lookahead sits in the
  decode request's prompt, and OpenAI's penalties count outputs only.
"""

from __future__ import annotations

import httpx
import pytest

from specapprox_vllm.policies import build_policy, get_policy, make_approx_config, method_names
from specapprox_vllm.tools.eval.needle import make_needle_case
from specapprox_vllm.vllm_compat import PENALTY_PROCESSOR_PATH
from tests.test_speckv_vllm import FIXED_DRAFT_TEXT, generate, target_engine
from tests.test_vllm_compat import naive_penalties

pytestmark = pytest.mark.server
BUDGET, MAX_NEW, REP = 128, 16, 1.3
CASES = ((1200, 5, 0.1), (1200, 6, 0.25))  # length, seed, needle depth (early: dropped part)


def _penalty(prompt: list[int]):
    return lambda logits, outputs: naive_penalties(logits, prompt, outputs, REP, 0.0, 0.0)


@pytest.mark.timeout(1200)
async def test_penalty_counts_real_prompt_in_the_engine(referee, tokenizer) -> None:
    from vllm import SamplingParams

    from specapprox_vllm.frontend.target_runner import TargetKVRunner

    draft = tokenizer.encode(FIXED_DRAFT_TEXT, add_special_tokens=False)
    engine = target_engine(logits_processors=[PENALTY_PROCESSOR_PATH])
    try:
        runner = TargetKVRunner(engine)
        for i, (length, seed, depth) in enumerate(CASES):
            ids = make_needle_case(tokenizer, length, seed=seed, depth=depth).prompt_ids
            policy = build_policy(make_approx_config("speckv", {"kv_budget": BUDGET}))
            want, _ = referee._speckv_decode(ids, draft, policy, MAX_NEW,
                                             penalty=_penalty(ids))
            placeholders = ids[len(ids) - 1 - BUDGET:]
            wrong, _ = referee._speckv_decode(ids, draft, policy, MAX_NEW,
                                              penalty=_penalty(placeholders))
            assert want != wrong, "the dropped part holds no penalised token: no teeth"

            handle = await runner.compact(ids, draft, policy, f"pen{i}")
            dids, params, salt = runner.decode_request(handle, ids, SamplingParams(
                max_tokens=MAX_NEW, temperature=0.0, repetition_penalty=REP))
            assert params.repetition_penalty == 1.0  # moved to the logits processor
            out = await generate(engine, {"prompt_token_ids": dids, "cache_salt": salt},
                                 params, f"pen{i}-decode")
            await runner.drop(handle.key)
            got = list(out.outputs[0].token_ids)
            assert got == want, (i, tokenizer.decode(got), tokenizer.decode(want))
    finally:
        engine.shutdown()


def _kv_methods() -> list[str]:
    return [m for m in method_names() if get_policy(m).compresses_kv]


PENALTIES = {
    "repetition": {"repetition_penalty": REP},
    # OpenAI's penalties count outputs only: the lookahead's tokens are outputs
    "presence_frequency": {"presence_penalty": 1.5, "frequency_penalty": 1.0},
}


@pytest.mark.parametrize("penalties", PENALTIES.values(), ids=PENALTIES.keys())
@pytest.mark.parametrize("method", _kv_methods())
def test_penalty_counts_real_prompt_served_at_full_budget(server, needle, method,
                                                           penalties) -> None:
    """``C = L - 1`` keeps every entry: with penalties, each KV method must answer as full
    attention does, its self-drafted lookahead included."""
    url = server.base_url + "/v1/chat/completions"
    body = {"model": "SmolLM2-135M-Instruct", "messages": needle.messages, "max_tokens": 40,
            "temperature": 0, "return_token_ids": True, **penalties}
    none = httpx.post(url, json={**body, "approx": {"method": "none"}}, timeout=600)
    assert none.status_code == 200, none.text
    length = none.json()["usage"]["prompt_tokens"]
    policy = get_policy(method)
    approx: dict = {"method": method, "kv_budget": length - 1}
    if policy.needs_draft:
        approx["lookahead"] = 8  # n + 1 < max_tokens: the decode request has a continuation
    if policy.compresses_prompt:
        approx["prompt_budget"] = length + 1  # the prompt stage leaves this prompt alone
    r = httpx.post(url, json={**body, "approx": approx}, timeout=600)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]["approx"]
    assert usage["applied"] and usage["kv_entries_kept"] == length - 1, usage
    got = r.json()["choices"][0]["token_ids"]
    want = none.json()["choices"][0]["token_ids"]
    assert got == want, (method, r.json()["choices"][0]["message"]["content"],
                         none.json()["choices"][0]["message"]["content"])

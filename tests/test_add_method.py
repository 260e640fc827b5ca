"""Adding a method is one module (docs/policies.md, "Adding a method").

``tests/knorm_policy.py`` defines kvpress's KNorm (keep the C keys of smallest L2 norm per KV
head) as a settings class and a policy, registered with ``@register_policy``; no file of the
product knows it. A real server loads it with ``--approx.policy_modules`` (its engine workers
through ``$SPECAPPROX_POLICY_MODULES``) and serves it over HTTP through the real engines:
``usage.approx.kv_entries_kept == C``, and ``C = L - 1`` (nothing evicted) gives the same text
as ``none``. The kept set itself is checked against a naive loop.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from specapprox_vllm.policies import POLICIES, make_approx_config

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "tests" / "knorm_policy.py"


@pytest.fixture
def knorm():
    """The module registered for one test, the registry restored afterwards (other tests
    compare the registry with the YAML defaults)."""
    before = dict(POLICIES)
    spec = importlib.util.spec_from_file_location("knorm_policy_under_test", MODULE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the annotations through it
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    POLICIES.clear()
    POLICIES.update(before)


def naive_knorm(keys: torch.Tensor, budget: int) -> list[list[int]]:
    """Per KV head: sort positions by (norm, position), keep the first C, ascending."""
    out = []
    for h in range(keys.shape[1]):
        norms = [float(torch.linalg.vector_norm(keys[p, h])) for p in range(keys.shape[0])]
        order = sorted(range(len(norms)), key=lambda p: (norms[p], p))
        out.append(sorted(order[:budget]))
    return out


def test_knorm_policy_matches_a_naive_loop(knorm) -> None:
    from specapprox_vllm.policies import build_policy

    gen = torch.Generator().manual_seed(0)
    for length, budget in ((40, 8), (65, 63), (100, 30)):
        keys = torch.randn(length + 3, 2, 16, generator=gen)  # P + 3 draft tokens
        keys[5] = keys[6]  # a tie: the lower position wins
        policy = build_policy(make_approx_config("knorm", {"kv_budget": budget}))
        assert policy.compresses_kv and not policy.needs_draft and policy.kv_applies(length)
        got = policy.select_kv_once(length, None, keys)
        assert got.tolist() == naive_knorm(keys[: length - 1], budget)
    assert policy.select_kv_once(30, None, keys) is None  # L <= C: nothing to drop


@pytest.mark.server
@pytest.mark.timeout(900)
def test_a_method_added_as_one_module_is_served_over_http(needle) -> None:
    import openai

    from tests.conftest import require_model
    from tests.server_utils import ServerProcess

    require_model()
    srv = ServerProcess("--approx.policy_modules", "[tests/knorm_policy.py]",
                        "--draft.enabled", "false").start()
    try:
        client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0,
                               timeout=600)
        messages = needle.messages

        def ask(approx: dict) -> tuple[str, dict, int]:
            r = client.chat.completions.create(
                model="SmolLM2-135M-Instruct", messages=messages, max_tokens=24,
                temperature=0, extra_body={"approx": approx})
            usage = r.usage.model_extra["approx"]
            return r.choices[0].message.content, usage, r.usage.prompt_tokens

        full, usage, length = ask({"method": "none"})
        assert usage["method"] == "none" and length > 1000

        _, usage, _ = ask({"method": "knorm", "kv_budget": 256})
        assert usage["method"] == "knorm" and usage["applied"] is True
        assert usage["kv_entries_kept"] == 256
        assert usage["kv_blocks_after"] < usage["kv_blocks_before"]

        same, usage, _ = ask({"method": "knorm", "kv_budget": length - 1})
        assert usage["applied"] is True and usage["kv_entries_kept"] == length - 1
        assert same == full

        bad = client.chat.completions.with_raw_response.create
        with pytest.raises(openai.BadRequestError, match="kv_budget"):
            bad(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=4,
                extra_body={"approx": {"method": "knorm", "kv_budget": 0}})
    finally:
        srv.stop()

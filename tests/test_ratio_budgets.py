"""Ratio budgets (API.md: ``kv_ratio``, ``prompt_ratio``): validation, precedence against
absolute budgets, and resolution against the prompt length, checked against a rounding
written out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from specapprox_vllm.policies import build_policy, load_method_defaults, make_approx_config

REPO = Path(__file__).resolve().parents[1]



def _naive_ratio_budget(ratio: float, prompt_len: int, floor: int) -> int:
    """API.md: "that fraction of the prompt's tokens, rounded", within the method's limits
    (at least its always-kept window, at least 1). Rounding half up, written out by hand."""
    exact = ratio * prompt_len
    whole = int(exact)
    rounded = whole + 1 if exact - whole >= 0.5 else whole
    return max(rounded, floor, 1)


@pytest.mark.parametrize("prompt_len", [1, 33, 100, 319, 320, 325, 4000, 4096, 31999])
@pytest.mark.parametrize("ratio", [0.001, 0.05, 0.1, 0.25, 0.5, 1.0])
def test_ratio_budgets_resolve_to_the_rounded_share_of_the_prompt(ratio: float,
                                                                   prompt_len: int) -> None:
    d = load_method_defaults(REPO / "configs" / "methods")
    for method, ratio_key, budget_key, floor_key in [
        ("speckv", "kv_ratio", "kv_budget", "window"),
        ("snapkv", "kv_ratio", "kv_budget", "window"),
        ("streamingllm", "kv_ratio", "kv_budget", "sink_tokens"),
        ("specpc", "prompt_ratio", "prompt_budget", "window"),
        ("speckv_pc", "prompt_ratio", "prompt_budget", "pc_window"),
        ("speckv_pc", "kv_ratio", "kv_budget", "window"),
    ]:
        cfg = make_approx_config(method, {ratio_key: ratio}, d[method])
        assert getattr(cfg, ratio_key) == ratio
        resolved = cfg.for_prompt(prompt_len)
        want = _naive_ratio_budget(ratio, prompt_len, getattr(cfg, floor_key))
        assert getattr(resolved, budget_key) == want, (method, budget_key)
        assert resolved.budgets()[budget_key] == want
        # the resolved settings are ordinary: no ratio, the same through the workers' wire
        assert ratio_key not in resolved.model_dump()
        again = make_approx_config(method, resolved.model_dump())
        assert again == resolved and build_policy(again).cfg == resolved


def test_ratio_and_budget_precedence() -> None:
    yaml_budget = {"kv_budget": 300, "window": 16}
    # a request's ratio replaces the served budget; its budget replaces a served ratio
    assert make_approx_config("speckv", {"kv_ratio": 0.2}, yaml_budget).for_prompt(
        1000).kv_budget == 200
    assert make_approx_config("speckv", {"kv_budget": 64}, {"kv_ratio": 0.2}).for_prompt(
        1000).kv_budget == 64
    # a config without ratios resolves to itself
    plain = make_approx_config("speckv", yaml_budget)
    assert plain.for_prompt(1000) is plain and plain.budgets() == {"kv_budget": 300}
    assert make_approx_config("none").budgets() == {}
    # both in one source: an error naming the ratio
    for overrides, defaults in [({"kv_ratio": 0.1, "kv_budget": 64}, None),
                                (None, {"kv_ratio": 0.1, "kv_budget": 64})]:
        with pytest.raises(ValueError, match="^kv_ratio: give kv_ratio or kv_budget"):
            make_approx_config("speckv", overrides, defaults)
    # a ratio is never checked against the window before it is resolved: it cannot fail
    cfg = make_approx_config("speckv", {"kv_ratio": 0.01, "window": 200})
    assert cfg.for_prompt(4000).kv_budget == 200  # 40 < the window: the window


@pytest.mark.parametrize(("method", "overrides"), [
    ("none", {"kv_ratio": 0.5}),
    ("specpc", {"kv_ratio": 0.5}),
    ("snapkv", {"prompt_ratio": 0.5}),
    ("speckv", {"kv_ratio": 0.0}),
    ("speckv", {"kv_ratio": 1.01}),
    ("speckv", {"kv_ratio": -0.1}),
])
def test_bad_ratios_name_the_ratio(method: str, overrides: dict) -> None:
    key = next(iter(overrides))
    with pytest.raises(ValueError, match=key):
        make_approx_config(method, overrides)

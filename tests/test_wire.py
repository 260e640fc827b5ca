"""What travels to the engines: how far a flagged request may read the prefix cache.

The expectation is written from ALGORITHMS.md's scoring rows, not from the policies' code:
SpecKV and SnapKV score with the last ``W + 1`` prompt positions and all ``n`` draft tokens
(first row ``L - W - 1``), SpecPC with the last ``W`` prompt positions (first row ``L - W``);
StreamingLLM scores nothing, so it may read the whole cache.
"""

from __future__ import annotations

from specapprox_vllm.policies import build_policy, make_approx_config
from specapprox_vllm.wire import (
    KV_COMPACTION_KEY,
    PROMPT_SCORES_KEY,
    ScoringSpec,
    prefix_cache_cap,
)


def flagged(kind: str, method: str, prompt_len: int, n_draft: int, **settings) -> dict:
    policy = build_policy(make_approx_config(method, settings))
    return {kind: ScoringSpec.for_policy("k", policy, prompt_len, n_draft).to_extra()}


def test_prefix_cache_cap_stops_before_the_first_scoring_row() -> None:
    assert prefix_cache_cap(flagged(KV_COMPACTION_KEY, "speckv", 4000, 8, window=32)) == 3967
    assert prefix_cache_cap(flagged(KV_COMPACTION_KEY, "snapkv", 4000, 0, window=16)) == 3983
    assert prefix_cache_cap(flagged(PROMPT_SCORES_KEY, "specpc", 4000, 1, window=64)) == 3936
    # the cascade's draft run scores the prompt with its SpecPC window
    assert prefix_cache_cap(flagged(PROMPT_SCORES_KEY, "speckv_pc", 4000, 8,
                                    pc_window=64)) == 3936
    assert prefix_cache_cap(flagged(KV_COMPACTION_KEY, "streamingllm", 4000, 0)) is None
    assert prefix_cache_cap(None) is None
    assert prefix_cache_cap({"other": 1}) is None

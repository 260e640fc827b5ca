"""Approximation policies (pure torch): SpecKV, SnapKV-style, StreamingLLM, SpecPC, cascade.

Usage by the serving code::

    cfg = make_approx_config("speckv", overrides=request_keys, defaults=yaml_defaults["speckv"])
    policy = build_policy(cfg)          # one object per request
    if policy.applies(prompt_len): ...  # then select_prompt / select_kv

See ``docs/policies.md`` for the layout and how to add a method.
"""

from __future__ import annotations

from . import cascade, none, speckv, specpc, streamingllm  # noqa: F401  (registration)
from .base import (
    POLICIES,
    Policy,
    first_occurrences,
    get_policy,
    grouped_window_scores,
    pool1d,
    register_policy,
    topk_desc,
    window_probs,
)
from .config import (
    CONFIG_CLASSES,
    METHODS,
    ApproxConfig,
    load_method_defaults,
    make_approx_config,
)
from .speckv import speckv_scores, speckv_select, speckv_select_qk
from .specpc import (
    neighbor_offsets,
    specpc_record,
    specpc_record_scores,
    specpc_select,
    specpc_token_scores,
)
from .streamingllm import streamingllm_select

for _name, _cls in CONFIG_CLASSES.items():
    POLICIES[_name].config_cls = _cls


def build_policy(cfg: ApproxConfig) -> Policy:
    """The policy object for validated settings ``cfg`` (from :func:`make_approx_config`)."""
    return get_policy(cfg.method)(cfg)


__all__ = [
    "CONFIG_CLASSES",
    "METHODS",
    "POLICIES",
    "ApproxConfig",
    "Policy",
    "build_policy",
    "first_occurrences",
    "get_policy",
    "grouped_window_scores",
    "load_method_defaults",
    "make_approx_config",
    "neighbor_offsets",
    "pool1d",
    "register_policy",
    "speckv_scores",
    "speckv_select",
    "speckv_select_qk",
    "specpc_record",
    "specpc_record_scores",
    "specpc_select",
    "specpc_token_scores",
    "streamingllm_select",
    "topk_desc",
    "window_probs",
]

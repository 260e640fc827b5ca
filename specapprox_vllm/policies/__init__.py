"""Approximation policies (pure torch, no vLLM): one module per method, one registry.

Usage::

    cfg = make_approx_config("speckv", overrides=request_keys, defaults=yaml_defaults["speckv"])
    policy = build_policy(cfg)          # one object per request
    if policy.applies(prompt_len): ...  # its hooks: see base.py

Built-in methods register on import, in this order; others through
:func:`load_policy_modules`. See ``docs/policies.md`` for the hooks and how to add a method.
"""

from __future__ import annotations

# Registration order is the order in which methods are listed.
# isort: off
from . import none, specpc, speckv, cascade, snapkv, streamingllm  # noqa: F401
# isort: on
from .base import MethodConfig, Policy, check_budget
from .cascade import SpecKVPCConfig, SpecKVPCPolicy
from .none import NoneConfig, NonePolicy
from .ops import first_occurrences, grouped_window_scores, pool1d, topk_desc, window_probs
from .registry import (
    POLICIES,
    POLICY_MODULES_ENV,
    build_policy,
    get_policy,
    load_method_defaults,
    load_policy_modules,
    make_approx_config,
    method_names,
    register_policy,
)
from .snapkv import SnapKVConfig, SnapKVPolicy
from .speckv import SpecKVConfig, SpecKVPolicy, speckv_scores, speckv_select, speckv_select_qk
from .specpc import (
    SpecPCConfig,
    SpecPCPolicy,
    neighbor_offsets,
    specpc_record,
    specpc_record_scores,
    specpc_select,
    specpc_token_scores,
    window_row_weights,
)
from .streamingllm import StreamingLLMConfig, StreamingLLMPolicy, streamingllm_select

#: The server's default method, and the reference every approximation is compared with.
DEFAULT_METHOD = NonePolicy.name
#: Settings of any method (each is a :class:`MethodConfig` subclass).
ApproxConfig = MethodConfig


def __getattr__(name: str) -> tuple[str, ...]:
    # ``METHODS``: the registry's names at the time of asking (methods loaded later by
    # ``load_policy_modules`` included), never a second list.
    if name == "METHODS":
        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_METHOD",
    "POLICIES",
    "POLICY_MODULES_ENV",
    "ApproxConfig",
    "MethodConfig",
    "NoneConfig",
    "NonePolicy",
    "Policy",
    "SnapKVConfig",
    "SnapKVPolicy",
    "SpecKVConfig",
    "SpecKVPCConfig",
    "SpecKVPCPolicy",
    "SpecKVPolicy",
    "SpecPCConfig",
    "SpecPCPolicy",
    "StreamingLLMConfig",
    "StreamingLLMPolicy",
    "build_policy",
    "check_budget",
    "first_occurrences",
    "get_policy",
    "grouped_window_scores",
    "load_method_defaults",
    "load_policy_modules",
    "make_approx_config",
    "method_names",
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
    "window_row_weights",
]

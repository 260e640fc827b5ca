"""KNorm, a published KV-compression baseline, added as one module outside the product.

NVIDIA kvpress's ``KnormPress`` (after Devoto et al., "A Simple and Effective L2 Norm-Based
Strategy for KV Cache Compression", 2024): keys with a *small* L2 norm tend to draw the most
attention, so each KV head keeps the ``C`` keys of smallest norm. It needs no draft and no
attention scores, only the keys. Rotary embeddings rotate pairs of dimensions, so the norm
of a post-RoPE key equals that of the pre-RoPE key kvpress scores.

This file is what docs/policies.md's recipe asks for, and nothing else: a settings class, a
policy with the hooks it needs, ``@register_policy``. tests/test_add_method.py loads it into a
running server (``approx.policy_modules``) and serves it through the real engines.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from specapprox_vllm.policies import MethodConfig, Policy, register_policy, topk_desc


class KNormConfig(MethodConfig):
    method: Literal["knorm"] = "knorm"
    kv_budget: int = Field(256, gt=0, description="KV entries kept per layer per KV head (C)")


@register_policy
class KNormPolicy(Policy):
    """Per layer and KV head, the ``C`` keys of ``P[0 .. L-2]`` with the smallest L2 norm."""

    name = "knorm"
    config_cls = KNormConfig
    compresses_kv = True

    def kv_entries(self) -> int:
        return self.cfg.kv_budget

    def select_kv(self, scores: Tensor | None, keys: Tensor, prompt_len: int) -> Tensor | None:
        if prompt_len <= self.cfg.kv_budget:
            return None
        norms = keys.float().norm(dim=-1).t()  # [H_kv, L - 1]
        return topk_desc(-norms, self.cfg.kv_budget).sort(dim=1).values

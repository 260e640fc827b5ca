"""SnapKV-style baseline: SpecKV with no draft (``n = 0``; ALGORITHMS.md, "SpecKV").

The prompt's own last ``W + 1`` queries score the keys before the window; pooling, top-k and
the kept window are SpecKV's. Published SnapKV differs (last ``W`` queries, sum over them,
avg-pool kernel 5, window including ``P[L-1]``): see ALGORITHMS.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import MethodConfig
from .registry import register_policy
from .speckv import SpecKVPolicy

__all__ = ["SnapKVConfig", "SnapKVPolicy"]


class SnapKVConfig(MethodConfig):
    """SnapKV-style: SpecKV with ``n = 0`` (the prompt's own last ``W + 1`` queries score)."""

    method: Literal["snapkv"] = "snapkv"
    kv_budget: int = Field(256, gt=0)
    window: int = Field(32, ge=0)
    kernel: int = Field(7, ge=1)
    lookahead: Literal[0] = Field(0, description="always 0: SnapKV-style uses no draft")

    @model_validator(mode="after")
    def _check(self) -> SnapKVConfig:
        self.check_budget("kv_budget", "window")
        return self


@register_policy
class SnapKVPolicy(SpecKVPolicy):
    """SpecKV's scoring and selection, without a draft."""

    name = "snapkv"
    config_cls = SnapKVConfig
    needs_draft = False

    def draft_tokens(self, max_tokens: int | None) -> int:
        return 0

"""SpecKV-PC, the cascade (ALGORITHMS.md, "SpecKV-PC"): SpecPC, then SpecKV.

One draft run serves both stages. The draft generates ``n`` tokens from the full prompt ``P``
(SpecKV's ``n``: the request's ``max_tokens`` capped by ``max_lookahead``; the reference
configs let the draft write transformers' default of 20, which ``lookahead: 20`` restores)
while its attention is recorded exactly as for SpecPC with lookahead ``n`` (the prefill's last
``pc_window`` queries and the first ``n - 1`` decode steps). Stage 1 keeps
``P' = P[specpc_select(...)]`` (``prompt_budget`` tokens, kernel ``pc_kernel``, ``neighbors``);
when ``L <= prompt_budget`` the prompt is unchanged. Stage 2 is SpecKV on ``P'`` with the same
draft tokens ``D``: the target prefills ``P' + D`` (fresh positions ``0 .. L'-1``) and keeps
``kv_budget`` entries per layer and KV head (window ``window``, kernel ``kernel``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import MethodConfig
from .registry import register_policy
from .speckv import SpecKVStage, resolve_lookahead
from .specpc import SpecPCStage

__all__ = ["SpecKVPCConfig", "SpecKVPCPolicy"]


class SpecKVPCConfig(MethodConfig):
    """SpecKV-PC: SpecPC stage (``prompt_budget, pc_window, pc_kernel, neighbors,
    start_layer, weighted_query``) then SpecKV stage (``kv_budget, window, kernel``)."""

    method: Literal["speckv_pc"] = "speckv_pc"
    prompt_budget: int = Field(2048, gt=0)
    pc_window: int = Field(64, ge=0)
    pc_kernel: int = Field(32, ge=1)
    neighbors: int = Field(32, ge=0)
    start_layer: int = Field(8, ge=0)
    weighted_query: bool = True
    kv_budget: int = Field(256, gt=0)
    window: int = Field(32, ge=0)
    kernel: int = Field(7, ge=1)
    lookahead: int | None = Field(
        None, ge=1, description="draft tokens n, shared by both stages; null = the "
        "request's max_tokens, capped by max_lookahead (the reference configs: 20)")
    max_lookahead: int = Field(32, ge=1, description="cap on n when lookahead is null")

    @model_validator(mode="after")
    def _check(self) -> SpecKVPCConfig:
        self.check_budget("prompt_budget", "pc_window")
        self.check_budget("kv_budget", "window")
        return self


@register_policy
class SpecKVPCPolicy(SpecPCStage, SpecKVStage):
    """SpecPC on the prompt, then SpecKV on the compressed prompt ``P'``, one draft run."""

    name = "speckv_pc"
    config_cls = SpecKVPCConfig
    needs_draft = True
    compresses_prompt = True
    compresses_kv = True

    def _pc(self) -> tuple[int, int, int]:
        c = self.cfg
        return c.prompt_budget, c.pc_window, c.pc_kernel

    def draft_tokens(self, max_tokens: int | None) -> int:
        """SpecKV's n (ALGORITHMS.md, "SpecKV-PC"); at least one token, which the SpecPC
        stage's draft run generates anyway."""
        return max(1, resolve_lookahead(self.cfg.lookahead, self.cfg.max_lookahead, max_tokens))

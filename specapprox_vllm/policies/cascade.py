"""SpecKV-PC, the cascade (ALGORITHMS.md, "SpecKV-PC"): SpecPC, then SpecKV.

One draft run serves both stages. The draft generates ``n`` tokens (default 20) from the full
prompt ``P`` while its attention is recorded exactly as for SpecPC with lookahead ``n`` (the
prefill's last ``pc_window`` queries and the first ``n - 1`` decode steps). Stage 1 keeps
``P' = P[specpc_select(...)]`` (``prompt_budget`` tokens, kernel ``pc_kernel``, ``neighbors``);
when ``L <= prompt_budget`` the prompt is unchanged. Stage 2 is SpecKV on ``P'`` with the same
draft tokens ``D``: the target prefills ``P' + D`` (fresh positions ``0 .. L'-1``) and keeps
``kv_budget`` entries per layer and KV head (window ``window``, kernel ``kernel``).

The whole request is served without approximation when ``L <= kv_budget``.
"""

from __future__ import annotations

from torch import Tensor

from .base import Policy, register_policy
from .speckv import speckv_select_qk
from .specpc import specpc_select

__all__ = ["SpecKVPCPolicy"]


@register_policy
class SpecKVPCPolicy(Policy):
    """SpecPC on the prompt, then SpecKV on the compressed prompt, one draft run."""

    name = "speckv_pc"
    needs_draft = True
    compresses_prompt = True
    compresses_kv = True

    def applies(self, prompt_len: int) -> bool:
        return prompt_len > self.cfg.kv_budget

    def prompt_applies(self, prompt_len: int) -> bool:
        return prompt_len > self.cfg.prompt_budget and prompt_len >= self.cfg.pc_window

    def draft_tokens(self, max_tokens: int | None) -> int:
        return self.cfg.lookahead

    def prompt_query_window(self) -> int:
        return self.cfg.pc_window

    def kv_query_window(self, n_draft: int) -> int:
        return self.cfg.window + n_draft + 1

    def select_prompt(self, token_scores: Tensor) -> Tensor | None:
        """Stage 1 on the original prompt (``None``: ``L <= prompt_budget``, keep ``P``)."""
        c = self.cfg
        return specpc_select(token_scores, c.prompt_budget, c.pc_window, c.pc_kernel, c.neighbors)

    def select_kv(
        self,
        prompt_len: int,
        num_kv_heads: int,
        q_window: Tensor | None = None,
        keys: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor | None:
        """Stage 2; ``prompt_len`` is the length ``L'`` of the (possibly) compressed prompt."""
        c = self.cfg
        if prompt_len <= c.kv_budget:
            return None
        if q_window is None or keys is None:
            raise ValueError(f"{self.name} needs the window queries and the keys")
        return speckv_select_qk(q_window, keys, prompt_len, c.kv_budget, c.window, c.kernel, scale)

"""StreamingLLM baseline: attention sinks plus the most recent tokens (Xiao et al., 2023).

To run through exactly the same KV-compaction machinery as SpecKV, the kept set is drawn from
``P[0 .. L-2]`` and ``P[L-1]`` is re-fed at position ``L-1`` when decoding starts: with budget
``C`` and ``S`` sink tokens the cache keeps ``P[0 .. S-1]`` and ``P[L-1-(C-S) .. L-2]``, the
same positions for every layer and KV head. At ``L = C + 1`` this is all of ``P[0 .. L-2]``
(full attention), as for SpecKV. Only the prompt is compressed once; the cache is not rolled
during decoding (the budget bounds the prompt's share of the cache, as for the other methods).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Policy, register_policy

__all__ = ["StreamingLLMPolicy", "streamingllm_select"]


def streamingllm_select(
    prompt_len: int, budget: int, sink_tokens: int, device: torch.device | str | None = None
) -> Tensor | None:
    """Kept prompt positions ``[C]`` sorted ascending, or ``None`` when ``L <= C``."""
    if not 0 <= sink_tokens <= budget:
        raise ValueError(f"sink_tokens {sink_tokens} must be in [0, kv_budget {budget}]")
    if prompt_len <= budget:
        return None
    sinks = torch.arange(sink_tokens, device=device)
    recent = torch.arange(prompt_len - 1 - (budget - sink_tokens), prompt_len - 1, device=device)
    return torch.cat([sinks, recent])


@register_policy
class StreamingLLMPolicy(Policy):
    """Sinks + recent window; needs neither the draft nor attention scores."""

    name = "streamingllm"
    compresses_kv = True

    def applies(self, prompt_len: int) -> bool:
        return prompt_len > self.cfg.kv_budget

    def select_kv(
        self,
        prompt_len: int,
        num_kv_heads: int,
        q_window: Tensor | None = None,
        keys: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor | None:
        device = keys.device if keys is not None else None
        idx = streamingllm_select(prompt_len, self.cfg.kv_budget, self.cfg.sink_tokens, device)
        if idx is None:
            return None
        return idx.expand(num_kv_heads, -1).contiguous()

"""StreamingLLM baseline: attention sinks plus the most recent tokens (Xiao et al., 2023).

To run through exactly the same KV-compaction machinery as SpecKV, the kept set is drawn from
``P[0 .. L-2]`` and ``P[L-1]`` is re-fed at position ``L-1`` when decoding starts: with budget
``C`` and ``S`` sink tokens the cache keeps ``P[0 .. S-1]`` and ``P[L-1-(C-S) .. L-2]``, the
same positions for every layer and KV head. At ``L = C + 1`` this is all of ``P[0 .. L-2]``
(full attention), as for SpecKV. Only the prompt is compressed once; the cache is not rolled
during decoding (the budget bounds the prompt's share of the cache, as for the other methods).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from .base import MethodConfig, Policy
from .registry import register_policy

__all__ = ["StreamingLLMConfig", "StreamingLLMPolicy", "streamingllm_select"]


class StreamingLLMConfig(MethodConfig):
    """StreamingLLM: ``sink_tokens`` first tokens plus the most recent ones."""

    method: Literal["streamingllm"] = "streamingllm"
    kv_budget: int = Field(256, gt=0)
    sink_tokens: int = Field(4, ge=0)

    @model_validator(mode="after")
    def _check(self) -> StreamingLLMConfig:
        self.check_budget("kv_budget", "sink_tokens")
        return self


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
    config_cls = StreamingLLMConfig
    compresses_kv = True

    def kv_entries(self) -> int:
        return self.cfg.kv_budget

    def select_kv(self, scores: Tensor | None, keys: Tensor, prompt_len: int) -> Tensor | None:
        idx = streamingllm_select(prompt_len, self.cfg.kv_budget, self.cfg.sink_tokens,
                                  keys.device)
        return None if idx is None else idx.expand(keys.shape[1], -1).contiguous()

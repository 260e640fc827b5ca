"""SpecKV: draft-guided KV dropping (its draft-free special case, SnapKV-style, is snapkv.py).

ALGORITHMS.md, "SpecKV": the target prefills ``P + D`` (``D`` = the draft's ``n`` tokens). In
every layer the last ``W' = W + n + 1`` queries (the last ``W + 1`` prompt tokens plus all of
``D``) score the keys before the window, ``P[0 .. L-W-2]``; per KV head the scores are reduced
by max over the ``G`` grouped query heads and the ``W'`` queries, max-pooled (kernel 7), and the
top ``C - W`` keys are kept together with the window ``P[L-W-1 .. L-2]``: exactly ``C``
entries per layer and KV head. ``P[L-1]`` and ``D`` are dropped from the cache; decoding
re-feeds ``P[L-1]`` at its original position ``L-1``.

Edges: ``L <= C`` means no compression (the select functions return ``None``); at
``L = C + 1`` every entry of ``P[0 .. L-2]`` is kept, i.e. full attention.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from .base import MethodConfig, Policy
from .ops import grouped_window_scores, pool1d, topk_desc
from .registry import register_policy

__all__ = [
    "SpecKVConfig",
    "SpecKVPolicy",
    "SpecKVStage",
    "speckv_scores",
    "speckv_select",
    "speckv_select_qk",
    "resolve_lookahead",
]


class SpecKVConfig(MethodConfig):
    """SpecKV: draft-guided KV dropping (ALGORITHMS.md, SpecKV)."""

    method: Literal["speckv"] = "speckv"
    kv_budget: int = Field(256, gt=0, description="KV entries kept per layer per KV head (C)")
    window: int = Field(32, ge=0, description="recent prompt tokens always kept (W)")
    kernel: int = Field(7, ge=1, description="max-pool kernel over key scores")
    lookahead: int | None = Field(
        None, ge=0, description="draft tokens n; null = the request's max_tokens"
    )
    max_lookahead: int = Field(32, ge=0, description="cap on n when lookahead is null")

    @model_validator(mode="after")
    def _check(self) -> SpecKVConfig:
        self.check_budget("kv_budget", "window")
        return self

    def resolve_lookahead(self, max_tokens: int | None) -> int:
        return resolve_lookahead(self.lookahead, self.max_lookahead, max_tokens)


def resolve_lookahead(lookahead: int | None, max_lookahead: int, max_tokens: int | None) -> int:
    """Draft length for a request: ``lookahead``, or ``min(max_tokens, max_lookahead)`` when
    it is null (ALGORITHMS.md: SpecKV and the cascade draft the request's answer length,
    capped)."""
    if lookahead is not None:
        return lookahead
    if max_tokens is None:
        return max_lookahead
    return max(0, min(max_tokens, max_lookahead))


def speckv_scores(
    q_window: Tensor, keys: Tensor, prompt_len: int, window: int, scale: float | None = None
) -> Tensor:
    """Key scores of the keys before the window: ``[H_kv, L - W - 1]`` float32.

    Args:
        q_window: ``[W + n + 1, H_q, D]`` post-RoPE queries of the last ``W + n + 1`` positions
            of the target prefill of ``P + D`` (for SnapKV-style, ``n = 0``).
        keys: ``[L + n, H_kv, D]`` post-RoPE keys of that prefill.
        prompt_len: ``L``.
        window: ``W``.
    """
    n_keys = prompt_len - window - 1
    if n_keys < 0:
        raise ValueError(f"prompt of {prompt_len} tokens is shorter than window {window} + 1")
    return grouped_window_scores(q_window, keys, n_keys=n_keys, scale=scale)


def speckv_select(
    scores: Tensor, prompt_len: int, budget: int, window: int, kernel: int
) -> Tensor | None:
    """Kept prompt positions per KV head, ``[H_kv, C]`` sorted ascending, or ``None``.

    Args:
        scores: ``[H_kv, L - W - 1]`` reduced window scores (:func:`speckv_scores`).
        prompt_len: ``L``; ``None`` is returned when ``L <= C`` (no compression).
        budget: ``C`` entries kept per KV head, ``C >= W``.
        window: ``W`` recent prompt tokens always kept (``P[L-W-1 .. L-2]``).
        kernel: max-pool kernel over the key axis (centred, zero padded).

    The top ``C - W`` pooled scores are chosen with ties going to the lower position.
    """
    if budget < window:
        raise ValueError(f"kv_budget {budget} < window {window}")
    if prompt_len <= budget:
        return None
    h_kv, n_keys = scores.shape
    if n_keys != prompt_len - window - 1:
        raise ValueError(
            f"scores cover {n_keys} keys, expected L - W - 1 = {prompt_len - window - 1}"
        )
    pooled = pool1d(scores.float(), kernel, "max")
    top = topk_desc(pooled, budget - window)
    win = torch.arange(prompt_len - window - 1, prompt_len - 1, device=scores.device)
    kept = torch.cat([top, win.expand(h_kv, window)], dim=1)
    return kept.sort(dim=1).values


def speckv_select_qk(
    q_window: Tensor,
    keys: Tensor,
    prompt_len: int,
    budget: int,
    window: int,
    kernel: int,
    scale: float | None = None,
) -> Tensor | None:
    """:func:`speckv_scores` followed by :func:`speckv_select` (skips the scoring if L <= C)."""
    if prompt_len <= budget:
        return None
    scores = speckv_scores(q_window, keys, prompt_len, window, scale)
    return speckv_select(scores, prompt_len, budget, window, kernel)


class SpecKVStage(Policy):
    """SpecKV's scoring and selection (shared with SnapKV-style and the cascade): the last
    ``W + n + 1`` positions score the keys before the window, per KV head."""

    def kv_entries(self) -> int:
        return self.cfg.kv_budget

    def kv_rows(self, prompt_len: int, n_draft: int) -> range:
        """The last ``W + n + 1`` positions: ``P[L-W-1 ..]`` and all of ``D``."""
        return range(prompt_len - self.cfg.window - 1, prompt_len + n_draft)

    def score_kv_chunk(self, q_rows: Tensor, keys: Tensor, prompt_len: int,
                       scale: float | None = None) -> Tensor:
        return speckv_scores(q_rows, keys, prompt_len, self.cfg.window, scale)

    def select_kv(self, scores: Tensor | None, keys: Tensor, prompt_len: int) -> Tensor | None:
        if scores is None:
            raise ValueError(f"{self.name} selects from attention scores")
        c = self.cfg
        return speckv_select(scores, prompt_len, c.kv_budget, c.window, c.kernel)


@register_policy
class SpecKVPolicy(SpecKVStage):
    """SpecKV: the draft's ``n`` tokens join the scoring window of the target prefill."""

    name = "speckv"
    config_cls = SpecKVConfig
    needs_draft = True
    compresses_kv = True

    def draft_tokens(self, max_tokens: int | None) -> int:
        return self.cfg.resolve_lookahead(max_tokens)

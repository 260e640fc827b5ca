"""SpecKV (draft-guided KV dropping) and its draft-free special case, SnapKV-style (n = 0).

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

import torch
from torch import Tensor

from .base import Policy, grouped_window_scores, pool1d, register_policy, topk_desc

__all__ = ["SnapKVPolicy", "SpecKVPolicy", "speckv_scores", "speckv_select", "speckv_select_qk"]


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


@register_policy
class SpecKVPolicy(Policy):
    """SpecKV: the draft's ``n`` tokens join the scoring window of the target prefill."""

    name = "speckv"
    needs_draft = True
    compresses_kv = True

    def applies(self, prompt_len: int) -> bool:
        return prompt_len > self.cfg.kv_budget

    def draft_tokens(self, max_tokens: int | None) -> int:
        return self.cfg.resolve_lookahead(max_tokens)

    def kv_query_window(self, n_draft: int) -> int:
        return self.cfg.window + n_draft + 1

    def select_kv(
        self,
        prompt_len: int,
        num_kv_heads: int,
        q_window: Tensor | None = None,
        keys: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor | None:
        if not self.applies(prompt_len):
            return None
        if q_window is None or keys is None:
            raise ValueError(f"{self.name} needs the window queries and the keys")
        c = self.cfg
        return speckv_select_qk(q_window, keys, prompt_len, c.kv_budget, c.window, c.kernel, scale)


@register_policy
class SnapKVPolicy(SpecKVPolicy):
    """SnapKV-style: SpecKV with ``n = 0``, scored by the prompt's own last ``W + 1`` queries."""

    name = "snapkv"
    needs_draft = False

    def draft_tokens(self, max_tokens: int | None) -> int:
        return 0

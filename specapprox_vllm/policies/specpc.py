"""SpecPC: draft-guided prompt compression (ALGORITHMS.md, "SpecPC").

The draft reads ``P`` and generates ``n`` tokens. Its attention is recorded in every draft
layer ``>= start_layer``: the prefill's last ``W`` prompt queries (rows weighted by
``linspace(0, 1, W)`` when ``weighted_query``), and the one query of each later decode step
(the first ``n - 1`` draft tokens, weight 1). Each record is reduced by max over heads and
rows to one score per key; per step the layers are reduced by max, cut to the first ``L``
keys, and the steps are reduced by max. Everything stays in float32 (the reference casts
probabilities back to bf16, which creates ties; this project does not).

Selection: centred max-pool (kernel ``K``), top ``C`` (ties to the lower index), ``N``
neighbours around each chosen token in the order ``0, -1, +1, -2, +2, ...`` (clamped, first
occurrences kept), the last ``W`` positions prepended, cut to ``C``, sorted. The target then
serves ``P[idx]`` as an ordinary, shorter prompt.

Because every reduction is a max, recording a single prefill of ``P + D[:n-1]`` whose last
``W + n - 1`` queries score, with only the first ``W`` of those rows weighted, gives the same
``score[L]`` as the step-wise records (up to floating-point differences between prefill and
decode attention); :func:`specpc_record` accepts either.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import (
    Policy,
    first_occurrences,
    pool1d,
    register_policy,
    topk_desc,
    window_probs,
)

__all__ = [
    "SpecPCPolicy",
    "neighbor_offsets",
    "specpc_record",
    "specpc_record_scores",
    "specpc_select",
    "specpc_token_scores",
]


def specpc_record_scores(probs: Tensor, n_weighted: int, weighted_query: bool) -> Tensor:
    """Reduce one attention record ``[H, R, S]`` to ``[S]`` (max over heads and rows).

    Args:
        probs: float32 probabilities of ``R`` query rows against ``S`` keys.
        n_weighted: how many leading rows are prompt-window rows (``W`` in the prefill record,
            0 in a decode-step record). With ``weighted_query`` they are multiplied by
            ``linspace(0, 1, n_weighted)``; like the reference, a single row is never weighted.
        weighted_query: the SpecPC ``weighted_query`` switch.
    """
    probs = probs.float()
    if weighted_query and n_weighted > 1:
        w = torch.ones(probs.shape[1], dtype=torch.float32, device=probs.device)
        w[:n_weighted] = torch.linspace(0, 1, n_weighted, device=probs.device)
        probs = probs * w[None, :, None]
    return probs.amax(dim=(0, 1))


def specpc_record(
    q_rows: Tensor,
    keys: Tensor,
    n_weighted: int,
    weighted_query: bool,
    scale: float | None = None,
) -> Tensor:
    """One layer's record from post-RoPE tensors: ``[S]`` float32.

    ``q_rows`` is ``[R, H_q, D]`` (the last ``R`` positions of the sequence whose keys are
    ``keys`` ``[S, H_kv, D]``); see :func:`specpc_record_scores` for ``n_weighted``.
    """
    return specpc_record_scores(window_probs(q_rows, keys, scale), n_weighted, weighted_query)


def specpc_token_scores(
    records: Sequence[Sequence[Tensor | None]], prompt_len: int, start_layer: int
) -> Tensor:
    """Aggregate reduced records into ``score[L]`` (float32).

    Args:
        records: ``records[step][layer]`` is a ``[S_step]`` record (step 0 = the prefill,
            ``S_step >= L``); layers below ``start_layer`` are ignored and may be ``None``.
        prompt_len: ``L``; keys beyond the prompt (draft tokens) are cut off.
        start_layer: first draft layer that counts.
    """
    per_step = []
    for step in records:
        layers = [r[:prompt_len].float() for r in step[start_layer:] if r is not None]
        if not layers:
            raise ValueError(f"no draft layer >= start_layer {start_layer} was recorded")
        per_step.append(torch.stack(layers).amax(dim=0))
    if not per_step:
        raise ValueError("no SpecPC records")
    return torch.stack(per_step).amax(dim=0)


def neighbor_offsets(neighbors: int, device: torch.device | str | None = None) -> Tensor:
    """Offsets ``-((N-1)//2) .. N-1-(N-1)//2`` ordered ``0, -1, +1, -2, +2, ...``.

    ``N = 0`` and ``N = 1`` both mean "the token alone" (offset 0).
    """
    n = max(neighbors, 1)
    lo = -((n - 1) // 2)
    off = torch.arange(lo, lo + n, device=device)
    key = 2 * off.abs() + (off > 0).long()  # |offset| first, -k before +k
    return off[torch.argsort(key)]


def specpc_select(
    score: Tensor, budget: int, window: int, kernel: int, neighbors: int
) -> Tensor | None:
    """Prompt positions kept by SpecPC, sorted ascending (exactly ``C``), or ``None``.

    Args:
        score: ``[L]`` token scores (:func:`specpc_token_scores`).
        budget: ``C`` tokens kept; ``None`` is returned when ``L <= C`` or ``L < W``.
        window: ``W`` last positions that are always kept.
        kernel: max-pool kernel ``K`` (centred, zero padded; odd or even).
        neighbors: ``N`` tokens kept around each selected token.
    """
    length = score.shape[-1]
    if length <= budget or length < window:
        return None
    pooled = pool1d(score.float(), kernel, "max")
    top = topk_desc(pooled, budget)  # descending score order
    off = neighbor_offsets(neighbors, device=score.device)
    cand = (top[:, None] + off[None, :]).clamp_(0, length - 1).reshape(-1)
    win = torch.arange(length - window, length, device=score.device)
    kept = first_occurrences(torch.cat([win, cand]), length)[:budget]
    return kept.sort().values


@register_policy
class SpecPCPolicy(Policy):
    """SpecPC: the target serves ``P[select_prompt(score)]`` as a fresh, shorter prompt."""

    name = "specpc"
    needs_draft = True
    compresses_prompt = True

    def applies(self, prompt_len: int) -> bool:
        return prompt_len > self.cfg.prompt_budget and prompt_len >= self.cfg.window

    def prompt_applies(self, prompt_len: int) -> bool:
        return self.applies(prompt_len)

    def draft_tokens(self, max_tokens: int | None) -> int:
        return self.cfg.lookahead

    def prompt_query_window(self) -> int:
        return self.cfg.window

    def select_prompt(self, token_scores: Tensor) -> Tensor | None:
        c = self.cfg
        return specpc_select(token_scores, c.prompt_budget, c.window, c.kernel, c.neighbors)

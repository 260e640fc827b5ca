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
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from .base import MethodConfig, Policy
from .ops import first_occurrences, pool1d, topk_desc, window_probs
from .registry import register_policy

__all__ = [
    "SpecPCConfig",
    "SpecPCPolicy",
    "SpecPCStage",
    "neighbor_offsets",
    "specpc_record",
    "specpc_record_scores",
    "specpc_select",
    "specpc_token_scores",
    "window_row_weights",
]


class SpecPCConfig(MethodConfig):
    """SpecPC: draft-guided prompt compression (ALGORITHMS.md, SpecPC)."""

    method: Literal["specpc"] = "specpc"
    prompt_budget: int = Field(1024, gt=0, description="prompt tokens kept (C)")
    window: int = Field(64, ge=0, description="last prompt tokens kept and scoring (W)")
    lookahead: int = Field(1, ge=1, description="draft tokens n; the first n-1 also score")
    kernel: int = Field(32, ge=1, description="max-pool kernel K")
    neighbors: int = Field(32, ge=0, description="tokens kept around each selected token")
    start_layer: int = Field(8, ge=0, description="draft layers below are ignored")
    weighted_query: bool = True

    @model_validator(mode="after")
    def _check(self) -> SpecPCConfig:
        self.check_budget("prompt_budget", "window")
        return self


def window_row_weights(positions: Tensor, prompt_len: int, window: int,
                       weighted_query: bool) -> Tensor:
    """Weights of scoring rows at ``positions``: the prompt-window rows ``P[L-W .. L-1]``
    weigh ``linspace(0, 1, W)`` (the first 0, the last 1), draft rows (``>= L``) weigh 1.
    Like the reference, a window of one row is never weighted."""
    w = torch.ones(positions.shape[0], dtype=torch.float32, device=positions.device)
    if not weighted_query or window <= 1:
        return w
    lin = torch.linspace(0, 1, window, device=positions.device)
    in_window = positions < prompt_len
    w[in_window] = lin[positions[in_window] - (prompt_len - window)]
    return w


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
    rows = torch.arange(probs.shape[1], device=probs.device)
    w = window_row_weights(rows, n_weighted, n_weighted, weighted_query)
    return (probs * w[None, :, None]).amax(dim=(0, 1))


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


class SpecPCStage(Policy):
    """The SpecPC stage, shared with the cascade: the prompt window's last rows and the
    first ``n - 1`` draft tokens score the prompt in the draft layers ``>= start_layer``.
    Subclasses say which settings hold the stage's window and kernel."""

    def _pc(self) -> tuple[int, int, int]:
        """(prompt_budget, window, kernel) of the SpecPC stage."""
        c = self.cfg
        return c.prompt_budget, c.window, c.kernel

    def prompt_applies(self, prompt_len: int) -> bool:
        budget, window, _ = self._pc()
        return prompt_len > budget and prompt_len >= window

    def check_draft(self, num_layers: int) -> None:
        if self.cfg.start_layer >= num_layers:
            raise ValueError(f"start_layer: {self.cfg.start_layer} must be below the draft's "
                             f"{num_layers} layers")

    def prompt_rows(self, prompt_len: int, n_draft: int) -> range:
        return range(max(0, prompt_len - self._pc()[1]), prompt_len + max(n_draft, 1) - 1)

    def scores_layer(self, layer: int) -> bool:
        return layer >= self.cfg.start_layer

    def prompt_row_weights(self, positions: Tensor, prompt_len: int) -> Tensor:
        return window_row_weights(positions, prompt_len, self._pc()[1], self.cfg.weighted_query)

    def select_prompt(self, score: Tensor) -> Tensor | None:
        budget, window, kernel = self._pc()
        return specpc_select(score, budget, window, kernel, self.cfg.neighbors)


@register_policy
class SpecPCPolicy(SpecPCStage):
    """SpecPC: the target serves ``P[select_prompt(score)]`` as a fresh, shorter prompt."""

    name = "specpc"
    config_cls = SpecPCConfig
    needs_draft = True
    compresses_prompt = True

    def draft_tokens(self, max_tokens: int | None) -> int:
        return self.cfg.lookahead

"""Naive reference implementations of the policies, written from ALGORITHMS.md.

Deliberately independent of ``specapprox_vllm.policies``: Python loops over heads, queries,
tokens and offsets, plain lists and ``sorted`` with an explicit ``(-score, index)`` key. Slow,
obvious, and only used by the tests to check the vectorised code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def naive_window_probs(q_window: Tensor, keys: Tensor, scale: float | None = None) -> Tensor:
    """``[H_q, Wq, S]`` float32: per query head and window query, one causal softmax row."""
    wq, h_q, d = q_window.shape
    s, h_kv, _ = keys.shape
    g = h_q // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(h_q, wq, s, dtype=torch.float32)
    for h in range(h_q):
        kv = h // g
        for i in range(wq):
            pos = s - wq + i
            visible = keys[: pos + 1, kv, :].to(q_window.dtype)  # keys 0..pos
            logits = torch.mv(visible, q_window[i, h]) * scale  # input dtype
            out[h, i, : pos + 1] = torch.softmax(logits.float(), dim=0)
    return out


def naive_pool(values: list[float], kernel: int) -> list[float]:
    """Centred max over ``[j - (K-1)//2, j + K-1-(K-1)//2]``, zeros outside the sequence."""
    left = (kernel - 1) // 2
    right = kernel - 1 - left
    n = len(values)
    out = []
    for j in range(n):
        best = values[j]
        for t in range(j - left, j + right + 1):
            v = values[t] if 0 <= t < n else 0.0
            best = max(best, v)
        out.append(best)
    return out


def naive_topk(values: list[float], k: int) -> list[int]:
    """Top ``k`` positions by descending value, ties to the lower position."""
    return sorted(range(len(values)), key=lambda j: (-values[j], j))[:k]


def naive_speckv_scores(probs: Tensor, h_kv: int, n_keys: int) -> list[list[float]]:
    """Max over grouped query heads and window queries, keys ``0 .. n_keys-1``."""
    h_q, wq, _ = probs.shape
    g = h_q // h_kv
    out = []
    for kv in range(h_kv):
        row = []
        for j in range(n_keys):
            best = 0.0
            for h in range(kv * g, (kv + 1) * g):
                for i in range(wq):
                    best = max(best, float(probs[h, i, j]))
            row.append(best)
        out.append(row)
    return out


def naive_speckv_select(
    scores: list[list[float]], prompt_len: int, budget: int, window: int, kernel: int
) -> list[list[int]] | None:
    """SpecKV steps 3-4 per KV head: top ``C - W`` pooled keys plus ``P[L-W-1 .. L-2]``."""
    if prompt_len <= budget:
        return None
    kept = []
    for row in scores:
        pooled = naive_pool(row, kernel)
        top = naive_topk(pooled, budget - window)
        win = list(range(prompt_len - window - 1, prompt_len - 1))
        kept.append(sorted(top + win))
    return kept


def naive_streamingllm(prompt_len: int, budget: int, sink: int) -> list[int] | None:
    """Sinks ``0 .. S-1`` and the ``C - S`` tokens just before ``P[L-1]``."""
    if prompt_len <= budget:
        return None
    kept = list(range(sink))
    start = prompt_len - 1 - (budget - sink)
    for j in range(start, prompt_len - 1):
        kept.append(j)
    return kept


def naive_offsets(neighbors: int) -> list[int]:
    """``0, -1, +1, -2, +2, ...`` restricted to ``[-((N-1)//2), N-1-(N-1)//2]``."""
    n = max(neighbors, 1)
    lo, hi = -((n - 1) // 2), n - 1 - (n - 1) // 2
    out = [0]
    for k in range(1, max(-lo, hi) + 1):
        if -k >= lo:
            out.append(-k)
        if k <= hi:
            out.append(k)
    return out


def naive_specpc_select(
    score: list[float], budget: int, window: int, kernel: int, neighbors: int
) -> list[int] | None:
    """SpecPC steps 3-6."""
    n = len(score)
    if n <= budget or n < window:
        return None
    pooled = naive_pool(score, kernel)
    top = naive_topk(pooled, budget)
    seq = list(range(n - window, n))
    for t in top:
        for off in naive_offsets(neighbors):
            seq.append(min(max(t + off, 0), n - 1))
    seen: set[int] = set()
    uniq = []
    for x in seq:
        if x not in seen:
            seen.add(x)
            uniq.append(x)
    return sorted(uniq[:budget])


def naive_specpc_scores(
    records: list[list[Tensor | None]],
    prompt_len: int,
    window: int,
    start_layer: int,
    weighted_query: bool,
) -> list[float]:
    """SpecPC step 2 from raw probability records ``records[step][layer] = [H, R, S]``.

    Step 0 is the prefill; its first ``window`` rows are prompt-window rows (weighted
    ``linspace(0, 1, W)``, row r weighing ``r / (W - 1)``, never a single row).
    """
    step_scores = []
    for step, layers in enumerate(records):
        per_layer = []
        for layer, probs in enumerate(layers):
            if layer < start_layer or probs is None:
                continue
            h, r, _ = probs.shape
            rec = []
            for j in range(prompt_len):
                best = 0.0
                for head in range(h):
                    for row in range(r):
                        w = 1.0
                        if step == 0 and weighted_query and window > 1 and row < window:
                            w = float(torch.tensor(row / (window - 1), dtype=torch.float32))
                        v = float(probs[head, row, j] * torch.tensor(w, dtype=torch.float32))
                        best = max(best, v)
                rec.append(best)
            per_layer.append(rec)
        step_scores.append([max(col) for col in zip(*per_layer, strict=True)])
    return [max(col) for col in zip(*step_scores, strict=True)]

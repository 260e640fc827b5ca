"""Prompt scores in the draft engine's workers (SpecPC, and the cascade's first stage).

A draft request flagged with ``extra_args[PROMPT_SCORES_KEY]`` gets one score per prompt
key. After each layer's real attention, the rows of ``policy.prompt_rows(L, n)`` that this
step computed, in the layers ``policy.scores_layer`` accepts, are scored against the keys
read from the paged cache (``policy.score_prompt_chunk``) and folded into one running ``[L]``
score (``policy.fold``). For SpecPC every reduction is a max, so folding step by step gives
exactly ALGORITHMS.md's score however chunked prefill splits the prompt and whether earlier
keys come from earlier chunks or the prefix cache. Rows served from the prefix cache are
never computed: such a score is reported incomplete, and the caller runs the draft again
without reading the prefix cache. The KV connector's scheduler side, which a separate draft
engine runs too, caps a flagged request's hit before its first scoring row, so that retry is
a guard, not the path of a repeated prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from specapprox_vllm import vllm_compat
from specapprox_vllm.wire import ScoringSpec
from specapprox_vllm.worker.store import RequestStore

MAX_STORED = 4096  # finished scores nobody fetched (aborted requests) are dropped, oldest first


@dataclass
class PromptScore:
    """Running score of one request in this worker (one tensor-parallel rank)."""

    spec: ScoringSpec
    score: Tensor | None = None
    rows: dict[int, set[int]] = field(default_factory=dict)  # layer -> prompt rows folded
    error: str | None = None
    ms: float = 0.0


SCORES: RequestStore[PromptScore] = RequestStore(MAX_STORED, PromptScore)


def layer_index(layer_name: str) -> int:
    """``model.layers.7.self_attn.attn`` -> 7."""
    parts = layer_name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a == "layers" and b.isdigit():
            return int(b)
    raise ValueError(f"cannot find a layer index in {layer_name!r}")


def score_layer(impl: Any, layer: Any, query: Tensor, kv_cache: Tensor, attn_metadata: Any,
                rows: dict[int, ScoringSpec]) -> None:
    """Fold this layer's scoring rows of every flagged request into its running score."""
    idx = layer_index(layer.layer_name)
    for row, spec in rows.items():
        entry = SCORES.entry(spec)
        policy = entry.spec.policy
        if entry.error is not None or not policy.scores_layer(idx):
            continue
        view = vllm_compat.batch_row(attn_metadata, row)
        if view is None:
            continue
        length = spec.prompt_len
        rows_here = view.overlap(policy.prompt_rows(length, spec.n_draft))
        if not rows_here:
            continue
        t0 = time.perf_counter()
        try:
            keys = vllm_compat.paged_keys(layer, kv_cache, view.block_table, rows_here.stop)
            part = policy.score_prompt_chunk(view.queries(query, rows_here), keys,
                                             torch.tensor(rows_here), length,
                                             vllm_compat.attention_scale(impl))
            entry.score = policy.fold(entry.score, part)
            entry.rows.setdefault(idx, set()).update(range(rows_here.start,
                                                           min(rows_here.stop, length)))
        except Exception as exc:  # reported to the API process, which fails the draft
            entry.error = f"{type(exc).__name__}: {exc}"
        entry.ms += 1e3 * (time.perf_counter() - t0)


def pop_scores(keys: list[str]) -> dict[str, dict[str, Any]]:
    """Hand finished scores to the API process (through ``collective_rpc``) and forget them.
    ``complete`` is false when scoring prompt rows were never computed (prefix-cache hits)."""
    out = {}
    for key in keys:
        entry = SCORES.pop(key, None)
        if entry is None:
            continue
        spec = entry.spec
        scoring = spec.policy.prompt_rows(spec.prompt_len, spec.n_draft)
        want = set(range(scoring.start, min(scoring.stop, spec.prompt_len)))
        complete = bool(entry.rows) and all(r == want for r in entry.rows.values())
        score = entry.score.tolist() if entry.score is not None else None
        out[key] = {"score": score, "complete": complete, "error": entry.error,
                    "layers": sorted(entry.rows), "ms": entry.ms}
    return out


def count() -> int:
    """Scores held (finished or running): leak checks."""
    return len(SCORES)

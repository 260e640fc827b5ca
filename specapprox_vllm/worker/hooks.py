"""The callbacks vLLM's engine calls through :mod:`specapprox_vllm.vllm_compat`.

:func:`on_step` runs once per model step, before the forward pass: it records which batch
rows belong to flagged requests (the attention metadata carries no request ids).
:func:`after_attention` runs after every layer's real attention, when that step's K/V are
already in the paged cache, and hands the flagged rows to the prompt scorer (draft engine)
and the KV compactor (target engine). Both do nothing for unflagged batches.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from specapprox_vllm.wire import KV_COMPACTION_KEY, PROMPT_SCORES_KEY, ScoringSpec
from specapprox_vllm.worker import kv_compaction, prompt_scores

# Worker-process state: this step's flagged rows (batch index -> spec) per kind of flag.
STEP_ROWS: dict[str, dict[int, ScoringSpec]] = {PROMPT_SCORES_KEY: {}, KV_COMPACTION_KEY: {}}
_RUNNER: list[Any] = []  # this worker's model runner (rotary modules are found through it)


def on_step(runner: Any, extras: dict[int, dict[str, Any]]) -> None:
    """Publish this step's flagged rows (``extras``: batch row -> ``extra_args``)."""
    if not _RUNNER:
        _RUNNER.append(runner)
    for kind, rows in STEP_ROWS.items():
        rows.clear()
        for i, extra in extras.items():
            if kind in extra:
                rows[i] = ScoringSpec.from_extra(extra[kind])


def after_attention(impl: Any, layer: Any, query: Tensor, kv_cache: Tensor,
                    attn_metadata: Any) -> None:
    if attn_metadata is None:
        return
    rows = STEP_ROWS[PROMPT_SCORES_KEY]
    if rows:
        prompt_scores.score_layer(impl, layer, query, kv_cache, attn_metadata, rows)
    rows = STEP_ROWS[KV_COMPACTION_KEY]
    if rows:
        kv_compaction.compact_layer(impl, layer, query, kv_cache, attn_metadata, rows,
                                    _RUNNER[0] if _RUNNER else None)

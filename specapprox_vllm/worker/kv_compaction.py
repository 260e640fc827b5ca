"""KV compaction in the target engine's workers (every KV method: SpecKV, SnapKV-style,
StreamingLLM, the cascade's second stage, and any registered KV policy).

A *scoring request* on the target engine is ``P + D`` (``D``: the draft's ``n`` tokens, empty
for draft-free methods) flagged with ``extra_args[KV_COMPACTION_KEY]``; with self-draft it is
``P`` alone, and ``D`` are the target's own first tokens, fed back one decode step at a time.
Either way vLLM computes the sequence like any request (chunked, batched, maybe preempted and
recomputed), and :func:`compact_layer` runs after each layer's real attention:

* the query rows of ``policy.kv_rows(L, n)`` that a step computes are kept, by position (a
  recomputed row replaces itself), until the step that computes the last token of ``P + D``;
* in that step each layer reads the keys once, scores all its rows in one call
  (``policy.score_kv_chunk``, folded with ``policy.fold``: the one-shot computation of
  ALGORITHMS.md "SpecKV" step 3, however the rows were spread over prefill chunks and decode
  steps), selects its ``C`` entries per KV head (``policy.select_kv``), gathers their K/V
  from the paged cache, re-rotates the keys by ``delta = L - 1 - C`` so that decoding can run
  at vLLM's natural positions ``C, C + 1, ...`` with every relative distance unchanged, and
  keeps ``[C, H_kv, D]`` K and V per layer in :data:`STORE` under the request's key.

The decode request then gets those rows injected by :mod:`.kv_connector`. Each tensor-parallel
rank sees (and stores) only its own KV heads.
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

MAX_STORED = 1024  # entries nobody decoded or dropped (crashed clients) go, oldest first
INCOMPLETE = "incomplete: window rows came from the prefix cache"


@dataclass
class KVEntry:
    """One request's compaction state, then its compacted K/V, in this worker."""

    spec: ScoringSpec
    queries: dict[str, dict[int, Tensor]] = field(default_factory=dict)  # layer -> pos -> q
    kv: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # layer -> K, V
    indices: dict[str, Tensor] = field(default_factory=dict)  # layer -> [H_kv, C]
    error: str | None = None
    ms: float = 0.0
    seen: dict[str, int] = field(default_factory=dict)  # layer -> longest sequence computed
    recomputed: bool = False  # computed again from an earlier position (preempted)


STORE: RequestStore[KVEntry] = RequestStore(MAX_STORED, KVEntry)
_ROPE: dict[str, Any] = {}  # layer name -> rotary module


def compact_layer(impl: Any, layer: Any, query: Tensor, kv_cache: Tensor, attn_metadata: Any,
                  rows: dict[int, ScoringSpec], runner: Any) -> None:
    """Fold this layer's scoring rows of every scoring request; compact at the last token."""
    name = layer.layer_name
    for row, spec in rows.items():
        entry = STORE.entry(spec)
        view = vllm_compat.batch_row(attn_metadata, row)
        if entry.error is not None or view is None:
            continue
        t0 = time.perf_counter()
        try:
            spec = entry.spec
            entry.recomputed |= view.computed_before < entry.seen.get(name, 0)
            entry.seen[name] = max(entry.seen.get(name, 0), view.seq_len)
            rows_here = view.overlap(spec.policy.kv_rows(spec.prompt_len, spec.n_draft))
            if rows_here:  # vLLM reuses its query buffer: keep a copy
                q = view.queries(query, rows_here).clone()
                entry.queries.setdefault(name, {}).update(zip(rows_here, q, strict=True))
            if view.seq_len == spec.seq_len:
                _finish_layer(entry, name, layer, kv_cache, view.block_table,
                              vllm_compat.attention_scale(impl), runner)
        except Exception as exc:  # reported to the API process, which fails the request
            entry.error = f"{type(exc).__name__}: {exc}"
        entry.ms += 1e3 * (time.perf_counter() - t0)


def _finish_layer(entry: KVEntry, name: str, layer: Any, kv_cache: Tensor, table: Tensor,
                  scale: float, runner: Any) -> None:
    spec, policy = entry.spec, entry.spec.policy
    length = spec.prompt_len
    scoring = policy.kv_rows(length, spec.n_draft)
    rows = entry.queries.pop(name, {})
    scores = None
    if len(scoring):
        if set(rows) != set(scoring):
            # Scoring rows served from the prefix cache were never computed: the caller
            # re-runs the scoring request without reading the prefix cache.
            entry.error = INCOMPLETE
            return
        keys = vllm_compat.paged_keys(layer, kv_cache, table, scoring.stop)
        q = torch.stack([rows[p] for p in scoring])
        scores = policy.fold(None, policy.score_kv_chunk(q, keys, length, scale))
        keys = keys[: length - 1]
    else:
        keys = vllm_compat.paged_keys(layer, kv_cache, table, length - 1)
    idx = policy.select_kv(scores, keys, length)
    if idx is None:
        raise ValueError(f"prompt of {length} tokens is within kv_budget {policy.kv_entries()}")
    h_kv, c = idx.shape
    if c != policy.kv_entries():
        raise ValueError(f"{policy.name}.select_kv kept {c} entries, kv_entries() says "
                         f"{policy.kv_entries()}")
    values = vllm_compat.paged_values(layer, kv_cache, table, length - 1)
    gather = idx.t()[:, :, None].expand(c, h_kv, keys.shape[-1])  # row j, head h -> idx[h, j]
    k_sel = keys.gather(0, gather)
    v_sel = values.gather(0, gather)
    if name not in _ROPE:
        _ROPE[name] = vllm_compat.rotary_for_layer(runner, name)
    k_sel = vllm_compat.rerotate(k_sel, _ROPE[name], length - 1 - c)
    entry.kv[name] = (k_sel.contiguous(), v_sel.contiguous())
    if spec.want_indices:
        entry.indices[name] = idx.clone()


def support_problems(runner: Any) -> list[str]:
    """Why this model's attention cannot be compacted exactly (empty: it can): a sliding
    window on any layer, or a RoPE that re-rotation does not reproduce. Asked once at the
    server's start-up, so an unsupported model is refused then, not on its first request."""
    problems = []
    for name, layer in vllm_compat.runner_attention_layers(runner).items():
        window = vllm_compat.sliding_window(layer)
        if window is not None:
            problems.append(f"its attention layers use a sliding window ({window} tokens); "
                            "KV compaction keeps entries from the whole prompt")
        try:
            _ROPE[name] = vllm_compat.rotary_for_layer(runner, name)
        except vllm_compat.UnsupportedRope as e:
            problems.append(str(e).removeprefix(f"{name}: "))
    return sorted(set(problems))


def stored(key: str) -> KVEntry | None:
    """The entry of a finished scoring request (the connector loads its K/V)."""
    return STORE.get(key)


def results(keys: list[str], with_indices: bool = False) -> dict[str, dict[str, Any]]:
    """Status of scoring requests (for ``collective_rpc``): layers compacted, error, time."""
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        entry = STORE.get(key)
        if entry is None:
            continue
        res: dict[str, Any] = {"layers": len(entry.kv), "error": entry.error, "ms": entry.ms,
                               "recomputed": entry.recomputed}
        if with_indices:
            res["indices"] = {n: t.tolist() for n, t in entry.indices.items()}
        out[key] = res
    return out


def drop(keys: list[str]) -> int:
    """Forget stored entries (finished or abandoned requests); returns how many existed."""
    return sum(STORE.pop(key, None) is not None for key in keys)


def store_info() -> dict[str, int]:
    """Entries and bytes held outside vLLM's KV pool (leak checks, docs)."""
    nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                 for e in STORE.values() for k, v in e.kv.values())
    return {"entries": len(STORE), "bytes": nbytes}

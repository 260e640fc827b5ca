"""Draft-side attention capture for SpecPC, inside vLLM's attention backend.

A draft request flagged with ``extra_args["specapprox_capture"]`` gets one SpecPC token score
per prompt key, computed in the worker exactly as docs/ALGORITHMS.md ("SpecPC", step 2) says:
in every layer ``>= start_layer``, the probabilities of the last ``W`` prompt queries
(weighted by ``linspace(0, 1, W)``) and of the queries of the first ``n - 1`` draft tokens,
against the prompt keys, reduced by max over heads, queries, layers and steps. Every
reduction is a max, so each forward step folds its rows into one running ``[L]`` maximum per
request: chunked prefill (window rows spread over chunks) and prefix-cache hits (earlier keys
only in the paged cache) need nothing special, except that rows served from the prefix cache
are never computed; such a capture is reported incomplete and the caller re-runs the draft
without reading the prefix cache.

Hooks (both in :mod:`specapprox_vllm.vllm_compat`'s list of patch points):
* an attention-backend override of CPU_ATTN whose ``impl.forward`` calls :func:`capture_layer`
  after the real attention (the step's K/V are already in the paged cache by then);
* a wrapper around the V1 model runner's ``_prepare_inputs`` that publishes, per step, which
  batch rows belong to flagged requests (the attention metadata carries no request ids).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from specapprox_vllm.kv_cache_io import check_cpu_layout, read_cpu_keys
from specapprox_vllm.policies import window_probs

EXTRA_KEY = "specapprox_capture"
MAX_STORED = 4096  # finished captures nobody fetched (aborted requests) are dropped, oldest first


@dataclass
class CaptureSpec:
    """What a flagged draft request asks for (sent in ``SamplingParams.extra_args``)."""

    key: str
    prompt_len: int
    window: int
    lookahead: int
    start_layer: int
    weighted_query: bool

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> CaptureSpec:
        return cls(**extra)


@dataclass
class Capture:
    """Running SpecPC scores of one request in this worker (one tensor-parallel rank)."""

    spec: CaptureSpec
    score: torch.Tensor
    window_rows_seen: int = 0
    layers_seen: set[int] = field(default_factory=set)
    ms: float = 0.0


# Worker-process state. Rows of the current step: batch index -> spec.
STEP_ROWS: dict[int, CaptureSpec] = {}
CAPTURES: OrderedDict[str, Capture] = OrderedDict()


def publish_step(extras: dict[int, dict[str, Any]]) -> None:
    """Record which batch rows of this step are flagged (called once per model step with
    ``vllm_compat.step_extra_args``)."""
    STEP_ROWS.clear()
    for i, extra in extras.items():
        if EXTRA_KEY in extra:
            STEP_ROWS[i] = CaptureSpec.from_extra(extra[EXTRA_KEY])


def layer_index(layer_name: str) -> int:
    """``model.layers.7.self_attn.attn`` -> 7."""
    parts = layer_name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a == "layers" and b.isdigit():
            return int(b)
    raise ValueError(f"cannot find a layer index in {layer_name!r}")


def _row_weights(positions: torch.Tensor, spec: CaptureSpec) -> torch.Tensor:
    """Prompt-window rows weigh ``linspace(0, 1, W)[p - (L - W)]``; draft rows weigh 1."""
    w = torch.ones(positions.shape[0], dtype=torch.float32)
    if not spec.weighted_query or spec.window <= 1:
        return w
    lin = torch.linspace(0, 1, spec.window)
    in_window = positions < spec.prompt_len
    w[in_window] = lin[positions[in_window] - (spec.prompt_len - spec.window)]
    return w


def capture_layer(impl: Any, layer: Any, query: torch.Tensor, kv_cache: torch.Tensor,
                  attn_metadata: Any) -> None:
    """Fold this layer's scoring rows of every flagged request into its running score."""
    if not STEP_ROWS or attn_metadata is None:
        return
    idx = layer_index(layer.layer_name)
    qsl = attn_metadata.query_start_loc.tolist()
    seq_lens = attn_metadata.seq_lens.tolist()
    for row, spec in STEP_ROWS.items():
        if idx < spec.start_layer or row + 1 >= len(qsl):
            continue
        t0 = time.perf_counter()
        start, end = qsl[row], qsl[row + 1]
        seq_len = seq_lens[row]
        computed_before = seq_len - (end - start)
        first_row = spec.prompt_len - spec.window  # position of the first scoring query
        lo = max(computed_before, first_row)
        hi = min(seq_len, spec.prompt_len + spec.lookahead - 1)
        if lo >= hi:
            continue
        cap = CAPTURES.get(spec.key)
        if cap is None:
            cap = CAPTURES[spec.key] = Capture(spec, torch.zeros(spec.prompt_len))
            while len(CAPTURES) > MAX_STORED:
                CAPTURES.popitem(last=False)
        check_cpu_layout(getattr(layer, "isa", None))
        keys = read_cpu_keys(kv_cache, attn_metadata.block_table[row],
                             torch.arange(hi, device=kv_cache.device))
        q = query[start + lo - computed_before: start + hi - computed_before]
        probs = window_probs(q, keys, impl.scale)  # [H_q, R, hi], causal, fp32
        positions = torch.arange(lo, hi)
        probs = probs * _row_weights(positions, spec)[None, :, None]
        record = probs.amax(dim=(0, 1))[: spec.prompt_len]
        n = record.shape[0]
        cap.score[:n] = torch.maximum(cap.score[:n], record)
        cap.layers_seen.add(idx)
        if idx == spec.start_layer:
            cap.window_rows_seen += int((positions < spec.prompt_len).sum())
        cap.ms += 1e3 * (time.perf_counter() - t0)


def pop_captures(keys: list[str]) -> dict[str, dict[str, Any]]:
    """Hand finished captures to the API process (through ``collective_rpc``) and forget
    them. ``complete`` is false when prompt-window rows were never computed (prefix hit)."""
    out = {}
    for key in keys:
        cap = CAPTURES.pop(key, None)
        if cap is None:
            continue
        want = min(cap.spec.window, cap.spec.prompt_len)
        out[key] = {"score": cap.score.tolist(), "complete": cap.window_rows_seen == want,
                    "layers": sorted(cap.layers_seen), "ms": cap.ms}
    return out

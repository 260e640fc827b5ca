"""Target-side SpecKV compaction, inside vLLM's attention backend (worker processes).

A *scoring request* on the target engine is the prompt ``P + D`` (``D``: the draft's ``n``
lookahead tokens; empty for SnapKV-style and StreamingLLM) flagged with
``extra_args["specapprox_kv"]``. While vLLM prefills it (chunked, batched with anything else),
the capture backend calls :func:`compact_layer` after each layer's real attention:

* rows of the last ``W' = W + n + 1`` positions fold their scores into a running per-layer,
  per-KV-head ``[H_kv, L - W - 1]`` maximum (max over grouped heads and window queries is
  decomposable, so chunked prefill needs nothing special; ALGORITHMS.md "SpecKV" step 3);
* in the step that computes the last token, each layer selects its ``C`` entries per KV head
  with the policy's own function (``speckv_select`` / ``streamingllm_select``), gathers their
  K/V from the paged cache, re-rotates the keys by ``delta = L - 1 - C`` so that decoding can
  run at vLLM's natural positions ``C, C + 1, ...`` with every relative distance unchanged,
  and keeps ``[C, H_kv, D]`` K and V per layer in :data:`STORE` under the request's key.

The decode request then gets those rows injected by :mod:`specapprox_vllm.kv_connector`.
Each tensor-parallel rank sees (and stores) only its own KV heads.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from specapprox_vllm.kv_cache_io import check_cpu_layout, read_cpu_keys, read_cpu_values
from specapprox_vllm.policies import grouped_window_scores, speckv_select, streamingllm_select

EXTRA_KEY = "specapprox_kv"
MAX_STORED = 1024  # entries nobody decoded or dropped (crashed clients) go, oldest first
SCORED_METHODS = ("speckv", "snapkv", "speckv_pc")


@dataclass
class KVSpec:
    """What a scoring request asks for (sent in ``SamplingParams.extra_args``)."""

    key: str
    method: str
    prompt_len: int  # L (the prompt the target serves; P' in the cascade)
    n_draft: int  # n: draft tokens appended to the prompt
    budget: int  # C
    window: int  # W
    kernel: int
    sink_tokens: int = 0
    want_indices: bool = False

    @property
    def query_window(self) -> int:
        return self.window + self.n_draft + 1 if self.method in SCORED_METHODS else 0

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.n_draft


@dataclass
class KVEntry:
    """One request's compaction state, then its compacted K/V, in this worker."""

    spec: KVSpec
    scores: dict[str, Tensor] = field(default_factory=dict)  # layer -> [H_kv, L-W-1]
    rows: dict[str, set[int]] = field(default_factory=dict)  # layer -> window rows folded
    kv: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # layer -> K, V
    indices: dict[str, Tensor] = field(default_factory=dict)  # layer -> [H_kv, C]
    error: str | None = None
    ms: float = 0.0


# Worker-process state. Rows of the current step: batch index -> spec.
STEP_ROWS: dict[int, KVSpec] = {}
STORE: OrderedDict[str, KVEntry] = OrderedDict()
_ROPE: dict[str, Any] = {}  # layer name -> rotary module (found through the model runner)
_RUNNER: list[Any] = []


def publish_step(extras: dict[int, dict[str, Any]], runner: Any) -> None:
    """Record which batch rows of this step are scoring requests (once per model step, with
    ``vllm_compat.step_extra_args``); the runner is kept to find the model's rotary module."""
    STEP_ROWS.clear()
    if not _RUNNER:
        _RUNNER.append(runner)
    for i, extra in extras.items():
        if EXTRA_KEY in extra:
            STEP_ROWS[i] = KVSpec(**extra[EXTRA_KEY])


class UnsupportedRope(RuntimeError):
    pass


def _rope_for(layer_name: str) -> Any:
    """The rotary module of the attention block that owns ``layer_name`` (``...self_attn``)."""
    if layer_name not in _ROPE:
        from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

        model = _RUNNER[0].get_model()
        parent = model.get_submodule(layer_name.rsplit(".", 1)[0])
        rope = getattr(parent, "rotary_emb", None)
        if not isinstance(rope, RotaryEmbedding) or (
            type(rope).forward_native is not RotaryEmbedding.forward_native):
            raise UnsupportedRope(
                f"{layer_name}: KV compaction re-rotates keys, which needs a standard "
                f"position-independent RoPE; found {type(rope).__name__}")
        _check_rerotation(rope)
        _ROPE[layer_name] = rope
    return _ROPE[layer_name]


def rerotate(keys: Tensor, rope: Any, delta: int) -> Tensor:
    """Post-RoPE keys ``[T, H, D]`` at positions ``p`` -> the same keys at ``p - delta``."""
    from vllm.model_executor.layers.rotary_embedding.common import ApplyRotaryEmb

    if delta == 0:
        return keys
    rot = rope.rotary_dim
    cos, sin = rope.cos_sin_cache[delta].float().chunk(2, dim=-1)
    x = keys.float()
    t = x.shape[0]
    turned = ApplyRotaryEmb.forward_static(x[..., :rot], cos.expand(t, -1),
                                           (-sin).expand(t, -1), rope.is_neox_style)
    return torch.cat([turned, x[..., rot:]], dim=-1).to(keys.dtype)


def _check_rerotation(rope: Any) -> None:
    """Refuse, once per model, a RoPE that re-rotation does not reproduce numerically."""
    g = torch.Generator().manual_seed(0)
    t, h, d = 4, 2, rope.head_size
    k = torch.randn(t, h * d, generator=g)
    p = torch.tensor([700, 701, 1500, 2047]).clamp_max(rope.cos_sin_cache.shape[0] - 1)
    delta = int(p.min()) - 3
    dummy = torch.zeros(t, h * d)
    _, at_p = rope.forward_static(p, dummy, k.clone(), d, rope.rotary_dim,
                                  rope.cos_sin_cache.float(), rope.is_neox_style)
    _, want = rope.forward_static(p - delta, dummy, k.clone(), d, rope.rotary_dim,
                                  rope.cos_sin_cache.float(), rope.is_neox_style)
    got = rerotate(at_p.view(t, h, d), rope, delta)
    err = (got - want.view(t, h, d)).abs().max().item()
    if err > 1e-3:
        raise UnsupportedRope(f"re-rotation mismatch {err:.2e} for {type(rope).__name__}")


def _entry(spec: KVSpec) -> KVEntry:
    entry = STORE.get(spec.key)
    if entry is None:
        entry = STORE[spec.key] = KVEntry(spec)
        while len(STORE) > MAX_STORED:
            STORE.popitem(last=False)
    return entry


def compact_layer(impl: Any, layer: Any, query: Tensor, kv_cache: Tensor,
                  attn_metadata: Any) -> None:
    """Fold this layer's window rows of every scoring request; compact at the last token."""
    if not STEP_ROWS or attn_metadata is None:
        return
    qsl = attn_metadata.query_start_loc.tolist()
    seq_lens = attn_metadata.seq_lens.tolist()
    name = layer.layer_name
    for row, spec in STEP_ROWS.items():
        if row + 1 >= len(qsl):
            continue
        entry = _entry(spec)
        if entry.error is not None:
            continue
        t0 = time.perf_counter()
        try:
            check_cpu_layout(getattr(layer, "isa", None))
            start, end = qsl[row], qsl[row + 1]
            seq_len = seq_lens[row]
            before = seq_len - (end - start)
            table = attn_metadata.block_table[row]
            lo = max(before, spec.seq_len - spec.query_window)
            keys = None
            if spec.query_window and lo < seq_len:
                keys = read_cpu_keys(kv_cache, table, torch.arange(seq_len))
                q = query[start + lo - before: end]
                part = grouped_window_scores(q, keys, spec.prompt_len - spec.window - 1,
                                             impl.scale)
                old = entry.scores.get(name)
                entry.scores[name] = part if old is None else torch.maximum(old, part)
                entry.rows.setdefault(name, set()).update(range(lo, seq_len))
            if seq_len == spec.seq_len:
                _finish_layer(entry, name, kv_cache, table, keys)
        except Exception as exc:  # reported to the API process, which fails the request
            entry.error = f"{type(exc).__name__}: {exc}"
        entry.ms += 1e3 * (time.perf_counter() - t0)


def _finish_layer(entry: KVEntry, name: str, kv_cache: Tensor, table: Tensor,
                  keys: Tensor | None) -> None:
    spec = entry.spec
    length, c = spec.prompt_len, spec.budget
    h_kv = kv_cache.shape[1]
    if spec.method in SCORED_METHODS:
        if len(entry.rows.pop(name, ())) != spec.query_window:
            # Window rows served from the prefix cache were never computed: the caller
            # re-runs the scoring request without reading the prefix cache.
            entry.error = "incomplete: window rows came from the prefix cache"
            return
        idx = speckv_select(entry.scores.pop(name), length, c, spec.window, spec.kernel)
    else:
        idx = streamingllm_select(length, c, spec.sink_tokens)
        idx = None if idx is None else idx.expand(h_kv, -1)
    if idx is None:
        raise ValueError(f"prompt of {length} tokens is within kv_budget {c}")
    positions = torch.arange(length - 1)
    if keys is None:
        keys = read_cpu_keys(kv_cache, table, positions)
    values = read_cpu_values(kv_cache, table, positions)
    gather = idx.t()[:, :, None].expand(c, h_kv, keys.shape[-1])  # row j, head h -> idx[h, j]
    k_sel = keys[: length - 1].gather(0, gather)
    v_sel = values.gather(0, gather)
    k_sel = rerotate(k_sel, _rope_for(name), length - 1 - c)
    entry.kv[name] = (k_sel.contiguous(), v_sel.contiguous())
    if spec.want_indices:
        entry.indices[name] = idx.clone()


def results(keys: list[str], with_indices: bool = False) -> dict[str, dict[str, Any]]:
    """Status of scoring requests (for ``collective_rpc``): layers compacted, error, time."""
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        entry = STORE.get(key)
        if entry is None:
            continue
        res: dict[str, Any] = {"layers": len(entry.kv), "error": entry.error,
                               "ms": entry.ms, "spec": asdict(entry.spec)}
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

"""HF-transformers referee: every approximation method end to end, one request at a time.

This is the reference the vLLM integration is compared with (token for token, and kept
``(layer, KV head, position)`` sets), so it is written for clarity, not speed: eager attention,
batch size 1, greedy decoding, one explicit forward per token. It never runs inside the
server. Selection comes from :mod:`specapprox_vllm.policies` (whose own reference is the
naive loops in ``tests/naive_policies.py``); what this module adds is the plumbing:

* the draft run (greedy, stops at EOS, ``n`` = tokens actually generated) with SpecPC
  attention records taken step-wise exactly as the reference does: the prefill's last ``W``
  queries, then the one query of each decode step (the first ``n - 1`` draft tokens);
* the target prefill of ``P + D`` with the post-RoPE queries of the last ``W + n + 1``
  positions captured per layer (keys come from the cache);
* KV compaction: per layer and KV head the kept entries are gathered into a fresh
  ``DynamicCache`` (``[1, H_kv, C, D]``) with the rotary positions they were computed with;
  decoding then feeds ``P[L-1]`` at position ``L-1`` and later tokens at ``L, L+1, ...``.

Post-RoPE tensors are captured by temporarily replacing the ``eager`` entry of transformers'
attention-function registry with a wrapper that records ``query`` / ``key`` and then calls
the model's own eager attention, so the captured values are exactly those the model used.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from specapprox_vllm.policies import (
    ApproxConfig,
    Policy,
    build_policy,
    make_approx_config,
    specpc_record,
    specpc_token_scores,
)

__all__ = ["Referee", "RefereeResult"]

# (logits [V], output tokens so far) -> adjusted logits: penalties in tests
Penalty = Callable[[Tensor, list[int]], Tensor]


@dataclass
class RefereeResult:
    """What one referee request produced.

    Attributes:
        tokens: the target's generated token ids (EOS included when hit).
        kept_kv: ``[layers, H_kv, C]`` kept positions (ascending) in the prompt the target
            prefilled (``P``, or ``P'`` after SpecPC in the cascade); ``None`` if the KV cache
            was not compressed.
        kept_prompt_idx: ``[C_pc]`` positions of ``P`` that the target was served (SpecPC,
            cascade); ``None`` if the prompt was not compressed.
        draft_tokens: the draft's tokens (empty when no draft ran).
        specpc_scores: ``[L]`` float32 SpecPC token scores, when computed.
        applied: whether any approximation was applied (``False`` when ``L <= budget``).
        target_prompt_len: length of the prompt the target prefilled.
    """

    tokens: list[int]
    kept_kv: Tensor | None = None
    kept_prompt_idx: Tensor | None = None
    draft_tokens: list[int] = field(default_factory=list)
    specpc_scores: Tensor | None = None
    applied: bool = False
    target_prompt_len: int = 0


class _Recorder:
    """Collects what the wrapped eager attention sees, per layer, for the current forward."""

    def __init__(self, last_queries: int) -> None:
        self.last_queries = last_queries
        self.queries: dict[int, Tensor] = {}  # layer -> [Wq, H_q, D]
        self.keys: dict[int, Tensor] = {}  # layer -> [S, H_kv, D]
        self.scaling: float | None = None

    def __call__(self, module: torch.nn.Module, query: Tensor, key: Tensor) -> None:
        wq = min(self.last_queries, query.shape[2])
        self.queries[module.layer_idx] = query[0, :, -wq:, :].transpose(0, 1).contiguous()
        self.keys[module.layer_idx] = key[0].transpose(0, 1).contiguous()
        self.scaling = module.scaling


@contextlib.contextmanager
def _capture(recorder: _Recorder | None) -> Iterator[None]:
    """Route eager attention through ``recorder`` for the duration of the block."""
    if recorder is None:
        yield
        return

    def attention(module: torch.nn.Module, query: Tensor, key: Tensor, *args: Any, **kw: Any):
        recorder(module, query, key)
        eager: Callable = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, *args, **kw)

    had_local = "eager" in ALL_ATTENTION_FUNCTIONS._local_mapping
    previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get("eager")
    ALL_ATTENTION_FUNCTIONS["eager"] = attention
    try:
        yield
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS["eager"] = previous
        else:
            del ALL_ATTENTION_FUNCTIONS["eager"]


def _load(model: str | Path | PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    if isinstance(model, PreTrainedModel):
        m = model
    else:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a local HF model folder (no config.json)")
        m = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="eager", local_files_only=True
        )
    if m.config._attn_implementation != "eager":
        m.set_attn_implementation("eager")
    if m.config.model_type not in ("llama", "qwen2"):
        raise ValueError(f"referee supports llama and qwen2, not {m.config.model_type}")
    return m.eval()


def _eos_ids(model: PreTrainedModel) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


class Referee:
    """Reference implementation of all methods on HF Llama / Qwen2 models.

    Args:
        target: local model folder or an already built HF model (tests build tiny random
            ones); loaded with eager attention in ``dtype``.
        draft: the draft, same forms; ``None`` = self-draft (the target drafts for itself).
        dtype: weights dtype for folders (fp32 is the exactness setting).
    """

    def __init__(
        self,
        target: str | Path | PreTrainedModel,
        draft: str | Path | PreTrainedModel | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.target = _load(target, dtype)
        self.draft = self.target if draft is None else _load(draft, dtype)
        self.eos = _eos_ids(self.target)

    # ------------------------------------------------------------------ model plumbing

    def _forward(
        self,
        model: PreTrainedModel,
        ids: Sequence[int],
        cache: DynamicCache,
        start_pos: int,
        recorder: _Recorder | None = None,
    ) -> Tensor:
        """Run ``ids`` at positions ``start_pos ..`` on top of ``cache``; last logits ``[V]``."""
        dev = model.device
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=dev)
        pos = torch.arange(start_pos, start_pos + len(ids), device=dev)[None]
        # no_grad: without it autograd keeps every layer's activations (≈25 GB at 3k tokens).
        with _capture(recorder), torch.no_grad():
            out = model(
                input_ids=input_ids,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[0, -1]

    def _decode(
        self, model: PreTrainedModel, first: int, pos: int, cache: DynamicCache, max_new: int,
        penalty: Penalty | None = None,
    ) -> list[int]:
        """Greedy decoding: feed ``first`` at ``pos``, then each argmax at the next position.
        ``penalty(logits, outputs)`` adjusts each step's logits (the outputs so far)."""
        tokens: list[int] = []
        tok = first
        while len(tokens) < max_new:
            logits = self._forward(model, [tok], cache, pos)
            if penalty is not None:
                logits = penalty(logits, tokens)
            tok = int(torch.argmax(logits))
            tokens.append(tok)
            pos += 1
            if tok in self.eos:
                break
        return tokens

    def full_generate(self, prompt_ids: Sequence[int], max_new_tokens: int,
                      penalty: Penalty | None = None) -> list[int]:
        """Plain greedy generation with full attention (prefill ``P``, decode)."""
        cache = DynamicCache()
        logits = self._forward(self.target, prompt_ids, cache, 0)
        if penalty is not None:
            logits = penalty(logits, [])
        tok = int(torch.argmax(logits))
        if max_new_tokens <= 0:
            return []
        if tok in self.eos or max_new_tokens == 1:
            return [tok]
        rest_penalty = None if penalty is None else (lambda lg, out: penalty(lg, [tok, *out]))
        return [tok, *self._decode(self.target, tok, len(prompt_ids), cache, max_new_tokens - 1,
                                   rest_penalty)]

    def run_draft(
        self,
        prompt_ids: Sequence[int],
        n: int,
        pc_window: int = 0,
        start_layer: int = 0,
        weighted_query: bool = True,
    ) -> tuple[list[int], Tensor | None]:
        """Greedy draft of up to ``n`` tokens (stops at EOS) and, if ``pc_window`` > 0, the
        SpecPC ``score[L]`` recorded step-wise (prefill window rows, then one row per step)."""
        length = len(prompt_ids)
        n_layers = self.draft.config.num_hidden_layers
        if pc_window > 0 and start_layer >= n_layers:
            raise ValueError(f"start_layer {start_layer} >= the draft's {n_layers} layers")
        records: list[list[Tensor | None]] = []

        def record(rec: _Recorder | None, n_weighted: int) -> None:
            if rec is None:
                return
            step: list[Tensor | None] = [None] * n_layers
            for layer in range(start_layer, n_layers):
                step[layer] = specpc_record(
                    rec.queries[layer], rec.keys[layer], n_weighted, weighted_query, rec.scaling
                )
            records.append(step)

        cache = DynamicCache()
        rec = _Recorder(pc_window) if pc_window > 0 else None
        draft: list[int] = []
        if n > 0 or rec is not None:
            logits = self._forward(self.draft, prompt_ids, cache, 0, rec)
            record(rec, pc_window)
        while len(draft) < n:
            tok = int(torch.argmax(logits))
            draft.append(tok)
            if tok in self.eos or len(draft) == n:
                break
            rec = _Recorder(1) if pc_window > 0 else None
            logits = self._forward(self.draft, [tok], cache, length + len(draft) - 1, rec)
            record(rec, 0)
        scores = specpc_token_scores(records, length, start_layer) if records else None
        return draft, scores

    def _speckv_decode(
        self,
        prompt_ids: Sequence[int],
        draft: Sequence[int],
        policy: Policy,
        max_new_tokens: int,
        scores_out: list[Tensor] | None = None,
        continuation: Sequence[int] = (),
        penalty: Penalty | None = None,
    ) -> tuple[list[int], Tensor]:
        """Prefill ``P + D``, keep ``policy.select_kv_once`` per layer, decode from
        ``P[L-1]``. The scoring queries are the policy's ``kv_rows``: the last ones.
        ``scores_out`` (a list) receives each layer's ``score_kv_chunk`` (tests that judge
        near-ties at the cut). ``continuation``: tokens already answered (self-draft); they
        are fed after ``P[L-1]`` and the returned tokens are the ones after them."""
        length, n = len(prompt_ids), len(draft)
        rows = policy.kv_rows(length, n)
        assert not rows or rows.stop == length + n, "the referee records the last queries"
        wq = len(rows)
        rec = _Recorder(wq) if wq > 0 else None
        cache = DynamicCache()
        self._forward(self.target, [*prompt_ids, *draft], cache, 0, rec)
        h_kv = self.target.config.num_key_value_heads
        kept, data = [], []
        for layer, lay in enumerate(cache.layers):
            k, v = lay.keys, lay.values  # [1, H_kv, L + n, D]
            q_win = rec.queries[layer] if rec is not None else None
            keys = k[0].transpose(0, 1)
            scale = rec.scaling if rec else None
            idx = policy.select_kv_once(length, q_win, keys, scale)
            if scores_out is not None and q_win is not None:
                scores_out.append(policy.score_kv_chunk(q_win, keys, length, scale))
            if idx is None:
                raise AssertionError("select_kv returned None although the policy applies")
            gather = idx[None, :, :, None].expand(1, h_kv, idx.shape[1], k.shape[-1])
            data.append((k.gather(2, gather), v.gather(2, gather)))
            kept.append(idx)
        compact = DynamicCache(ddp_cache_data=data)
        if not continuation:
            tokens = self._decode(self.target, prompt_ids[-1], length - 1, compact,
                                  max_new_tokens, penalty)
            return tokens, torch.stack(kept)
        assert penalty is None, "penalties after a continuation: not needed by any test"
        logits = self._forward(self.target, [prompt_ids[-1], *continuation], compact,
                               length - 1)
        tok = int(torch.argmax(logits))
        tokens = [tok]
        if tok not in self.eos and max_new_tokens > 1:
            tokens += self._decode(self.target, tok, length + len(continuation), compact,
                                   max_new_tokens - 1)
        return tokens[:max_new_tokens], torch.stack(kept)

    def self_draft_generate(
        self, prompt_ids: Sequence[int], policy: Policy, max_new_tokens: int,
        scores_out: list[Tensor] | None = None,
    ) -> tuple[list[int], Tensor | None]:
        """ALGORITHMS.md, "Self-draft": the target's own first ``n + 1`` greedy tokens (full
        attention; ``D`` = the first ``n``), then KV selection with that ``D`` and greedy
        decoding after them from the compacted cache. Returns all tokens and the kept sets
        (None when the answer ended within the lookahead)."""
        n = policy.draft_tokens(max_new_tokens)
        if max_new_tokens <= n + 1:
            return self.full_generate(prompt_ids, max_new_tokens), None
        head = self.full_generate(prompt_ids, n + 1)
        if len(head) < n + 1 or head[-1] in self.eos:
            return head, None
        tail, kept = self._speckv_decode(prompt_ids, head[:n], policy,
                                         max_new_tokens - n - 1, scores_out, continuation=head)
        return head + tail, kept

    # ------------------------------------------------------------------ public entry

    def generate(
        self,
        prompt_ids: Sequence[int] | Tensor,
        method: str,
        cfg: ApproxConfig | dict[str, Any] | None = None,
        max_new_tokens: int = 32,
    ) -> RefereeResult:
        """Serve one request with ``method`` (``cfg``: a config, override keys, or defaults)."""
        ids = [
            int(t) for t in (prompt_ids.tolist() if isinstance(prompt_ids, Tensor) else prompt_ids)
        ]
        if cfg is None or isinstance(cfg, dict):
            cfg = make_approx_config(method, cfg)
        if cfg.method != method:
            raise ValueError(f"method {method!r} with a {cfg.method!r} config")
        policy = build_policy(cfg)
        length = len(ids)
        if not policy.applies(length):
            return RefereeResult(self.full_generate(ids, max_new_tokens), target_prompt_len=length)

        draft: list[int] = []
        scores = None
        if policy.needs_draft:
            n = policy.draft_tokens(max_new_tokens)
            pc_window = 0
            if policy.prompt_applies(length):  # prompt rows: the last pc_window of P
                pc_window = length - policy.prompt_rows(length, n).start
            draft, scores = self.run_draft(
                ids,
                n,
                pc_window,
                getattr(cfg, "start_layer", 0),
                getattr(cfg, "weighted_query", True),
            )
        result = RefereeResult([], draft_tokens=draft, specpc_scores=scores, applied=True)

        if policy.prompt_applies(length):
            assert scores is not None
            idx = policy.select_prompt(scores)
            if idx is not None:
                result.kept_prompt_idx = idx
                ids = [ids[i] for i in idx.tolist()]
        result.target_prompt_len = len(ids)

        if policy.kv_applies(len(ids)):
            result.tokens, result.kept_kv = self._speckv_decode(ids, draft, policy, max_new_tokens)
        else:
            result.tokens = self.full_generate(ids, max_new_tokens)
        return result

"""What one approximation method is to the engine: its settings class and its policy hooks.

A method is one module: a :class:`MethodConfig` subclass (its ``approx`` keys, validated by
pydantic, with the paper defaults) and a :class:`Policy` subclass decorated with
:func:`~specapprox_vllm.policies.registry.register_policy`. Nothing else in the product names
a method: the API process and the engine workers look the policy up by name in the registry
and call these hooks, so a new method needs no other file.

The hooks, by where they run:

* **API process** (``specapprox_vllm/frontend``): the facts ``needs_draft``,
  ``compresses_prompt``, ``compresses_kv``; :meth:`Policy.applies`,
  :meth:`Policy.prompt_applies`, :meth:`Policy.kv_applies`, :meth:`Policy.draft_tokens`,
  :meth:`Policy.kv_entries`, :meth:`Policy.check_draft`.
* **Draft workers** score the prompt (``specapprox_vllm/worker/prompt_scores.py``): in every
  model step, the rows of :meth:`Policy.prompt_rows` that the step computes, in the layers
  :meth:`Policy.scores_layer` accepts, are scored by :meth:`Policy.score_prompt_chunk`
  (weighted by :meth:`Policy.prompt_row_weights`) and folded into one running ``[L]`` score
  with :meth:`Policy.fold`; the API process then calls :meth:`Policy.select_prompt`.
* **Target workers** compress the KV cache (``specapprox_vllm/worker/kv_compaction.py``): the
  rows of :meth:`Policy.kv_rows` are scored per layer by :meth:`Policy.score_kv_chunk` and
  folded with :meth:`Policy.fold`; at the last token :meth:`Policy.select_kv` picks the kept
  positions per KV head from the folded score (and, if it wants, the keys).

The hooks see chunks because vLLM splits a prefill into chunks, batches requests, and serves
earlier tokens from the prefix cache: a step computes some rows of a request, never
necessarily all of them. Folding chunk by chunk gives exactly the one-shot result whenever the
reduction is decomposable (a max is); :meth:`Policy.select_kv_once` is the one-shot form used
by the HF referee, through the same hooks.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from torch import Tensor

from .ops import grouped_window_scores, window_probs

__all__ = ["RATIO_KEYS", "MethodConfig", "Policy", "check_budget"]

#: Each ratio key and the absolute budget it stands for (API.md: ``kv_ratio``,
#: ``prompt_ratio``). A method has the ratio exactly when it has the budget.
RATIO_KEYS: dict[str, str] = {"kv_ratio": "kv_budget", "prompt_ratio": "prompt_budget"}


class MethodConfig(BaseModel):
    """Validated settings of one method. Unknown keys are rejected (``extra="forbid"``), so a
    typo never silently falls back to a default; every error names its field.

    A budget may be given as a fraction of the prompt (``kv_ratio`` for ``kv_budget``,
    ``prompt_ratio`` for ``prompt_budget``): a client then need not know the prompt's token
    count. The ratio stays a ratio until the prompt is known; :meth:`for_prompt` turns it into
    the absolute budget the policy and the workers use, so that nothing downstream of the
    scheduler ever sees a ratio."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str
    kv_ratio: float | None = Field(
        None, gt=0, le=1, description="kv_budget as a fraction of the prompt's tokens (rounded)")
    prompt_ratio: float | None = Field(
        None, gt=0, le=1, description="prompt_budget as a fraction of the prompt's tokens")
    # budget name -> the least it may be (its always-kept window), for ratio budgets
    _floors: dict[str, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _ratios_have_budgets(self) -> MethodConfig:
        for ratio, budget in RATIO_KEYS.items():
            if getattr(self, ratio) is not None and budget not in type(self).model_fields:
                raise ValueError(f"{ratio} is not a setting of method {self.method} "
                                 f"(it has no {budget})")
        return self

    @model_serializer(mode="wrap")
    def _omit_unset_ratios(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A budget given absolutely dumps as before: the ratio keys appear only when set.
        out = handler(self)
        for ratio in RATIO_KEYS:
            if ratio in out and out[ratio] is None:
                del out[ratio]
        return out

    def check_budget(self, budget_name: str, window_name: str) -> None:
        """:func:`check_budget` for this config's fields. A budget given as a ratio is checked
        when it is resolved (:meth:`for_prompt` never goes below the window)."""
        window = getattr(self, window_name)
        if self.ratio_for(budget_name) is not None:
            self._floors[budget_name] = window
            return
        check_budget(getattr(self, budget_name), budget_name, window, window_name)

    def ratio_for(self, budget_name: str) -> float | None:
        """The ratio this config gives for ``budget_name``, if any."""
        return next((getattr(self, r) for r, b in RATIO_KEYS.items() if b == budget_name), None)

    def budgets(self) -> dict[str, int]:
        """The absolute budgets this method has (``kv_budget``, ``prompt_budget``)."""
        return {b: getattr(self, b) for b in RATIO_KEYS.values() if b in type(self).model_fields}

    def for_prompt(self, prompt_len: int) -> MethodConfig:
        """These settings for a prompt of ``prompt_len`` tokens: each ratio becomes its
        budget, ``ratio * L`` rounded half up, and never below what the method must keep
        (its window, and 1). The result carries no ratio: it is an ordinary config, which is
        what the policy, the workers (through :mod:`specapprox_vllm.wire`) and
        ``usage.approx`` see."""
        updates: dict[str, Any] = {}
        for ratio, budget in RATIO_KEYS.items():
            r = getattr(self, ratio)
            if r is not None:
                updates[budget] = max(int(r * prompt_len + 0.5), self._floors.get(budget, 0), 1)
                updates[ratio] = None
        if not updates:
            return self
        resolved = self.model_copy(update=updates)
        resolved._floors = {}  # no ratio left: equal to the same settings given absolutely
        return resolved


def check_budget(budget: int, budget_name: str, window: int, window_name: str) -> None:
    """A budget must hold the always-kept window (the message starts with the field)."""
    if budget < window:
        raise ValueError(
            f"{budget_name} ({budget}) must be >= {window_name} ({window}): "
            f"the last {window_name} tokens are always kept"
        )


_EMPTY = range(0)


class Policy:
    """One approximation method. Subclasses set the class attributes and override the hooks
    their facts call for; the defaults describe a method that changes nothing.

    Attributes:
        name: the ``approx.method`` value.
        config_cls: its settings (a :class:`MethodConfig` subclass).
        needs_draft: a draft model runs before the target (its tokens, its attention).
        compresses_prompt: the target serves ``P[select_prompt(score)]`` as a fresh prompt.
        compresses_kv: after the target's prefill each layer keeps ``kv_entries()`` entries
            per KV head, from ``P[0 .. L-2]``; ``P[L-1]`` is re-fed when decoding starts.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    needs_draft: ClassVar[bool] = False
    compresses_prompt: ClassVar[bool] = False
    compresses_kv: ClassVar[bool] = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    # ------------------------------------------------------------------ API-process facts
    def applies(self, prompt_len: int) -> bool:
        """Whether a prompt of this length is approximated at all (else: served as is, with
        no draft run)."""
        return self.prompt_applies(prompt_len) or self.kv_applies(prompt_len)

    def prompt_applies(self, prompt_len: int) -> bool:
        """Whether :meth:`select_prompt` compresses a prompt of this length (the draft run
        must then score it)."""
        return False

    def kv_applies(self, prompt_len: int) -> bool:
        """Whether the KV of a served prompt of this length is compressed (``L > C``)."""
        return self.compresses_kv and prompt_len > self.kv_entries()

    def kv_entries(self) -> int:
        """``C``: KV entries kept per layer and KV head (KV methods' ``kv_budget``)."""
        raise NotImplementedError(f"{self.name} does not compress the KV cache")

    def draft_tokens(self, max_tokens: int | None) -> int:
        """How many tokens the draft generates for a request with ``max_tokens``."""
        return 0

    def check_draft(self, num_layers: int) -> None:
        """Reject settings the draft model cannot serve (``ValueError`` "<field>: ...")."""

    # ------------------------------------------------------------------ prompt scoring
    def prompt_rows(self, prompt_len: int, n_draft: int) -> range:
        """Positions of the draft sequence ``P + D`` whose queries score the prompt."""
        return _EMPTY

    def scores_layer(self, layer: int) -> bool:
        """Whether draft layer ``layer`` contributes to the prompt score."""
        return True

    def prompt_row_weights(self, positions: Tensor, prompt_len: int) -> Tensor:
        """Weight of each scoring row (float32, one per position)."""
        return torch.ones(positions.shape[0], dtype=torch.float32, device=positions.device)

    def score_prompt_chunk(self, q_rows: Tensor, keys: Tensor, positions: Tensor,
                           prompt_len: int, scale: float | None = None) -> Tensor:
        """One layer's score of the prompt keys from some scoring rows: ``[L]`` float32.

        ``q_rows`` ``[R, H_q, D]`` are the queries at ``positions`` (ascending, the last one
        being ``keys.shape[0] - 1``); ``keys`` ``[S, H_kv, D]`` every key up to it. Keys a
        chunk has not reached yet score 0 (a causal query gives them no probability)."""
        probs = window_probs(q_rows, keys, scale)  # [H_q, R, S], causal, fp32
        probs = probs * self.prompt_row_weights(positions, prompt_len)[None, :, None]
        record = probs.amax(dim=(0, 1))[:prompt_len]
        return F.pad(record, (0, prompt_len - record.shape[0]))

    def fold(self, running: Tensor | None, part: Tensor) -> Tensor:
        """Fold one chunk's (or layer's, or step's) score into the running score. Every
        built-in method reduces by max, which is decomposable: folding chunk by chunk gives
        the one-shot result however vLLM splits and batches the work."""
        return part if running is None else torch.maximum(running, part)

    def select_prompt(self, score: Tensor) -> Tensor | None:
        """Prompt positions the target keeps, sorted, or ``None`` (prompt unchanged)."""
        raise NotImplementedError(f"{self.name} does not compress the prompt")

    # ------------------------------------------------------------------ KV scoring
    def kv_rows(self, prompt_len: int, n_draft: int) -> range:
        """Positions of the target sequence ``P + D`` whose queries score the KV entries
        (empty: the method selects without attention scores)."""
        return _EMPTY

    def score_kv_chunk(self, q_rows: Tensor, keys: Tensor, prompt_len: int,
                       scale: float | None = None) -> Tensor:
        """One layer's per-KV-head scores from some scoring rows: ``[H_kv, L - 1]`` float32,
        max over the grouped query heads and the rows (``keys`` as in
        :meth:`score_prompt_chunk`)."""
        return grouped_window_scores(q_rows, keys, prompt_len - 1, scale)

    def select_kv(self, scores: Tensor | None, keys: Tensor, prompt_len: int) -> Tensor | None:
        """Per-KV-head kept positions ``[H_kv, C]`` of one layer, sorted, or ``None``.

        ``scores`` is the folded :meth:`score_kv_chunk` (``None`` when :meth:`kv_rows` is
        empty); ``keys`` ``[L - 1, H_kv, D]`` are the post-RoPE keys of ``P[0 .. L-2]``, the
        only positions a KV method may keep."""
        raise NotImplementedError(f"{self.name} does not compress the KV cache")

    def select_kv_once(self, prompt_len: int, q_rows: Tensor | None, keys: Tensor,
                       scale: float | None = None) -> Tensor | None:
        """:meth:`select_kv` from one prefill of ``P + D``: ``q_rows`` are the queries of
        :meth:`kv_rows` (``None`` when it is empty), ``keys`` all ``[L + n, H_kv, D]``."""
        scores = None
        if q_rows is not None:
            scores = self.score_kv_chunk(q_rows, keys, prompt_len, scale)
        return self.select_kv(scores, keys[: prompt_len - 1], prompt_len)

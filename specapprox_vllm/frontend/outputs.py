"""Two target requests, one answer: a self-drafted lookahead and its continuation.

The client sees one stream. vLLM's serving code reads ``RequestOutput``s in the request's
``output_kind``: ``DELTA`` (streaming: each output carries the new tokens), ``CUMULATIVE``
(each carries everything so far) or ``FINAL_ONLY`` (one output at the end). The lookahead's
last output is held open (not finished, no finish reason), and the continuation's outputs
carry the lookahead's tokens, text and log-probabilities in front wherever the kind is
cumulative.
"""

from __future__ import annotations

import copy
from typing import Any


def _kind(params: Any) -> str:
    kind = getattr(params, "output_kind", None)
    return getattr(kind, "name", "CUMULATIVE")


def streams(params: Any) -> bool:
    """Whether the lookahead's outputs reach the client while it runs (not FINAL_ONLY)."""
    return _kind(params) != "FINAL_ONLY"


class Answered:
    """The token ids a request has produced so far, whatever its output kind (a DELTA
    output carries only the new ones)."""

    def __init__(self, params: Any) -> None:
        self.delta = _kind(params) == "DELTA"
        self.token_ids: list[int] = []

    def add(self, out: Any) -> None:
        ids = list(out.outputs[0].token_ids)
        self.token_ids = [*self.token_ids, *ids] if self.delta else ids


def hold_open(out: Any) -> Any:
    """The lookahead's last output, shown as not finished: the answer goes on."""
    out.finished = False
    for c in out.outputs:
        c.finish_reason = None
        c.stop_reason = None
    return out


def _join_logprobs(first: Any, rest: Any) -> Any:
    if first is None or rest is None:
        return rest
    if isinstance(first, list):
        return [*first, *rest]
    joined = copy.deepcopy(first)  # vLLM's FlatLogprobs
    joined.extend(rest)
    return joined


class Continuation:
    """Maps the continuation's outputs to what the client expects after ``first``."""

    def __init__(self, first: Any, params: Any) -> None:
        self.cumulative = _kind(params) != "DELTA"
        self.first = first.outputs[0]
        self.cached = first.num_cached_tokens

    def __call__(self, out: Any) -> Any:
        out.num_cached_tokens = self.cached  # the prompt's cache hits were the lookahead's
        if self.cumulative:
            head = self.first
            for c in out.outputs:
                c.token_ids = [*head.token_ids, *c.token_ids]
                c.text = head.text + c.text
                c.logprobs = _join_logprobs(head.logprobs, c.logprobs)
                if head.cumulative_logprob is not None and c.cumulative_logprob is not None:
                    c.cumulative_logprob += head.cumulative_logprob
        return out

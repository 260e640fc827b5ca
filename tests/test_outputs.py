"""Joining a self-drafted lookahead and its continuation into one answer, per output kind
(``specapprox_vllm/frontend/outputs.py``), on vLLM's own output classes."""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind

from specapprox_vllm.frontend.outputs import Answered, Continuation, hold_open, streams


def out(tokens: list[int], text: str, finished: bool, reason: str | None = None,
        logprobs: list | None = None, cum: float | None = None, cached: int = 0
        ) -> RequestOutput:
    c = CompletionOutput(index=0, text=text, token_ids=list(tokens), cumulative_logprob=cum,
                         logprobs=logprobs, finish_reason=reason)
    return RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1, 2, 3],
                         prompt_logprobs=None, outputs=[c], finished=finished,
                         num_cached_tokens=cached)


def params(kind: RequestOutputKind) -> SamplingParams:
    return SamplingParams(max_tokens=10, output_kind=kind)


def test_delta_streams_and_keeps_deltas() -> None:
    p = params(RequestOutputKind.DELTA)
    answered = Answered(p)
    for o in (out([5], "a", False), out([6, 7], "bc", True, "length", cached=128)):
        answered.add(o)
    assert streams(p) and answered.token_ids == [5, 6, 7]
    last = out([6, 7], "bc", True, "length", cached=128)
    join = Continuation(last, p)
    held = hold_open(last)
    assert not held.finished and held.outputs[0].finish_reason is None
    nxt = join(out([8], "d", True, "stop", cached=64))
    assert nxt.outputs[0].token_ids == [8] and nxt.outputs[0].text == "d"  # a delta stays one
    assert nxt.num_cached_tokens == 128 and nxt.finished


@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY])
def test_cumulative_kinds_carry_the_lookahead_in_front(kind: RequestOutputKind) -> None:
    p = params(kind)
    assert streams(p) == (kind == RequestOutputKind.CUMULATIVE)
    first = out([5, 6], "ab", True, "length", logprobs=[{5: -0.1}, {6: -0.2}], cum=-0.3)
    answered = Answered(p)
    answered.add(first)
    assert answered.token_ids == [5, 6]
    join = Continuation(first, p)
    joined = join(out([7], "c", True, "stop", logprobs=[{7: -0.5}], cum=-0.5))
    c = joined.outputs[0]
    assert (list(c.token_ids), c.text, c.finish_reason) == ([5, 6, 7], "abc", "stop")
    assert c.logprobs == [{5: -0.1}, {6: -0.2}, {7: -0.5}]
    assert c.cumulative_logprob == pytest.approx(-0.8)

"""server/messages.py without a server: which chat messages OpenAI's rules refuse, and the
parameter the 400 names (the served answers are in test_validation_battery.py)."""

from __future__ import annotations

import pytest

from server.messages import MessageError, check_messages

TOOL_CALL = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]


@pytest.mark.parametrize("messages, param", [
    ([{"role": "wizard", "content": "Hi"}], "messages[0].role"),
    ([{"role": "user", "content": "Hi"}, {"role": "USER", "content": "Hi"}], "messages[1].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "system", "content": None}], "messages[0].content"),
    ([{"role": "tool", "tool_call_id": "c1"}], "messages[0].content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant"}], "messages[1].content"),
    # the first offending message is named, whatever follows
    ([{"role": "user"}, {"role": "wizard", "content": "x"}], "messages[0].content"),
])
def test_refused_as_openai_refuses(messages, param) -> None:
    with pytest.raises(MessageError) as e:
        check_messages({"messages": messages})
    assert e.value.param == param
    assert param in str(e.value) or "Invalid value" in str(e.value)


@pytest.mark.parametrize("messages", [
    [{"role": r, "content": "Hi"} for r in
     ("system", "developer", "user", "assistant", "tool", "function")],
    [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    [{"role": "user", "content": ""}],  # empty is a value; OpenAI accepts it
    [{"role": "assistant", "tool_calls": TOOL_CALL}],
    [{"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}],
])
def test_accepted(messages) -> None:
    check_messages({"messages": messages})


@pytest.mark.parametrize("body", [
    {}, {"messages": "Hi"}, {"messages": [42]}, {"messages": [{"content": "no role"}]},
    {"messages": [{"role": 7, "content": "Hi"}]},
])
def test_shapes_left_to_vllm(body) -> None:
    """Wrong shapes are vLLM's pydantic errors (their own messages): not raised here."""
    check_messages(body)

"""Chat ``messages`` checks where vLLM's OpenAI server is looser than OpenAI's API.

vLLM 0.32 renders any ``role`` string through the chat template (custom roles) and accepts a
user message without ``content`` (its pydantic model makes every message field optional).
OpenAI answers both with a 400 naming the parameter (``messages[0].role``,
``messages[0].content``); a client written against OpenAI expects that, and a typo'd role
silently rendered as a turn of its own changes the prompt. Only these two rules are checked
here: the shapes pydantic rejects (not a list, a message without ``role``, a number as
``content``) stay vLLM's, with vLLM's messages.
"""

from __future__ import annotations

from typing import Any

# OpenAI's chat roles (the API reference, "messages").
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# Roles whose ``content`` OpenAI requires; an assistant message may instead carry
# ``tool_calls`` or ``function_call`` (content then optional).
CONTENT_REQUIRED = ("system", "developer", "user", "tool", "function")


class MessageError(ValueError):
    """A chat message OpenAI would refuse: the message, and the parameter it names."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_messages(body: dict[str, Any]) -> None:
    """Raise :class:`MessageError` for the first message with an unknown ``role`` or with
    a missing (or null) ``content`` where OpenAI requires one."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            continue
        role = msg["role"]
        if isinstance(role, str) and role not in ROLES:
            supported = ", ".join(f"'{r}'" for r in ROLES)
            raise MessageError(f"Invalid value: '{role}'. Supported values are: {supported}.",
                               f"messages[{i}].role")
        needs_content = role in CONTENT_REQUIRED or (
            role == "assistant" and not msg.get("tool_calls") and not msg.get("function_call"))
        if needs_content and msg.get("content") is None:
            what = "Missing required parameter" if "content" not in msg else \
                "Invalid type (null) for required parameter"
            raise MessageError(f"{what}: 'messages[{i}].content'.", f"messages[{i}].content")

"""The ``none`` method: full attention, no draft, nothing selected (the server's default)."""

from __future__ import annotations

from typing import Literal

from .base import MethodConfig, Policy
from .registry import register_policy

__all__ = ["NoneConfig", "NonePolicy"]


class NoneConfig(MethodConfig):
    """Full attention."""

    method: Literal["none"] = "none"


@register_policy
class NonePolicy(Policy):
    """Plain serving: every fact is false, so :meth:`applies` is always false."""

    name = "none"
    config_cls = NoneConfig

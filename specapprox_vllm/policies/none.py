"""The ``none`` method: full attention, no draft, nothing selected."""

from __future__ import annotations

from .base import Policy, register_policy

__all__ = ["NonePolicy"]


@register_policy
class NonePolicy(Policy):
    """Plain serving; :meth:`applies` is always false."""

    name = "none"

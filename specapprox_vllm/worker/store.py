"""Per-request state kept in a worker between steps, bounded.

A flagged request's state lives from its first step until the API process collects it. A
request whose client vanished is never collected, so the store forgets the oldest entries
beyond a limit instead of growing without bound.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from specapprox_vllm.wire import ScoringSpec

T = TypeVar("T")


class RequestStore(OrderedDict[str, T], Generic[T]):
    """``key -> state``, at most ``limit`` entries, the oldest dropped first."""

    def __init__(self, limit: int, make: Callable[[ScoringSpec], T]) -> None:
        super().__init__()
        self.limit = limit
        self.make = make

    def entry(self, spec: ScoringSpec) -> T:
        """The state of ``spec``'s request, created at its first step."""
        state = self.get(spec.key)
        if state is None:
            state = self[spec.key] = self.make(spec)
            while len(self) > self.limit:
                self.popitem(last=False)
        return state

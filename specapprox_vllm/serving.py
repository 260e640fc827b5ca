"""Registers each approximation method's serving path with the draft scheduler.

A method is offered by the server only once its path through the engines exists; the
scheduler answers requests for any other method with a 400 that lists what is available.
"""

from __future__ import annotations

from typing import Any

from specapprox_vllm.draft_scheduler import DraftScheduler


def register_methods(scheduler: DraftScheduler, target: Any, draft: Any | None) -> None:
    """Attach the handlers whose engines are present. ``none`` is always served."""
    # SpecPC / SpecKV handlers are attached here as their vLLM integration lands.
    del scheduler, target, draft

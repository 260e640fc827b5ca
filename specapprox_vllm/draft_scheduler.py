"""The draft-model scheduler: the pipeline step between "request accepted" and "target engine
generates".

For every request it decides, from the request's validated ``approx`` settings, what the
target engine is handed: the prompt as is (``none``, or a prompt already within budget), or
an approximated request prepared with the draft engine's help (later methods). It returns a
:class:`Plan` (the prompt and sampling parameters for the target, plus the statistics that end
up in ``usage.approx``). It never generates the user's answer itself: the target engine does.

When the draft fails or times out (:class:`DraftFailure`), the server's ``on_draft_failure``
policy decides, here and nowhere else: ``fallback`` serves the prompt as is (full attention;
``usage.approx.fallback`` names the failure) and ``error`` answers 503 (vLLM's
``RetryableRequestError``), so that a sick draft never turns into a hung or broken request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from specapprox_vllm.draft_runner import DraftFailure
from specapprox_vllm.policies import ApproxConfig

DRAFT_FAILURE_POLICIES = ("fallback", "error")


class UnsupportedMethod(ValueError):
    """The method is valid but this server cannot run it (e.g. no draft engine)."""


@dataclass
class ApproxStats:
    """What ``usage.approx`` reports for one engine request (API.md, "Responses")."""

    method: str
    applied: bool
    prompt_tokens_in: int
    prompt_tokens_kept: int
    kv_entries_kept: int | None = None
    draft_tokens: int = 0
    draft_ms: float = 0.0
    select_ms: float = 0.0
    reason: str | None = None
    fallback: str | None = None  # "draft_error" / "draft_timeout": served with full attention
    # KV-compressing methods only (omitted otherwise):
    score_ms: float | None = None  # the target's scoring request (prefill of P + D), wall
    kv_blocks_before: int | None = None  # KV blocks the served prompt would hold uncompressed
    kv_blocks_after: int | None = None  # blocks the decode request held at admission (engine)
    kv_bytes_saved: int | None = None  # (before - after) blocks, in bytes of the target's KV
    kv_loads: int | None = None  # compacted-KV loads (> 1: preempted and reloaded)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()
                if v is not None or k in ("kv_entries_kept",)}


@dataclass
class Plan:
    """What the target engine is asked to serve for one request.

    ``sampling_params`` / ``cache_salt`` replace the user's when set (SpecKV's decode
    request); ``on_output`` sees the final engine output (engine-side KV accounting), and
    ``release`` is awaited once the target request has ended, however it ended.
    """

    prompt_token_ids: list[int]
    stats: ApproxStats
    extra: dict[str, Any] = field(default_factory=dict)
    sampling_params: Any | None = None
    cache_salt: str | None = None
    on_output: Callable[[Any], None] | None = None
    release: Callable[[], Awaitable[None]] | None = None


def _budget(cfg: ApproxConfig) -> int | None:
    """The prompt length up to which a method changes nothing: its smallest budget (the
    cascade still compresses the KV of a prompt within ``prompt_budget``)."""
    budgets = [int(v) for k in ("prompt_budget", "kv_budget")
               if (v := getattr(cfg, k, None)) is not None]
    return min(budgets) if budgets else None


class DraftScheduler:
    """Plans each request. Methods register here as they become available in the engine."""

    def __init__(self, draft_engine: Any | None = None, on_draft_failure: str = "fallback"
                 ) -> None:
        if on_draft_failure not in DRAFT_FAILURE_POLICIES:
            raise ValueError(f"on_draft_failure: {on_draft_failure!r} is not one of "
                             f"{', '.join(DRAFT_FAILURE_POLICIES)}")
        self.draft_engine = draft_engine
        self.on_draft_failure = on_draft_failure
        self.draft_failures = 0
        # Methods whose serving path exists. ``none`` needs nothing; the others are added by
        # their integration modules (SpecPC: draft scoring, SpecKV: target KV compaction).
        self._handlers: dict[str, Any] = {}

    @property
    def supported_methods(self) -> tuple[str, ...]:
        return ("none", *self._handlers)

    def add_handler(self, method: str, handler: Any) -> None:
        self._handlers[method] = handler

    def check_supported(self, method: str) -> None:
        if method not in self.supported_methods:
            raise UnsupportedMethod(
                f"method: {method!r} is not available on this server "
                f"(available: {', '.join(self.supported_methods)})"
            )

    def check(self, cfg: ApproxConfig) -> None:
        """Reject, before any work, what this server cannot run (a ``ValueError`` whose
        message starts with the offending field)."""
        self.check_supported(cfg.method)
        validate = getattr(self._handlers.get(cfg.method), "validate", None)
        if validate is not None:
            validate(cfg)

    async def plan(
        self, prompt_token_ids: list[int], sampling_params: Any, cfg: ApproxConfig,
        request_id: str,
    ) -> Plan:
        n = len(prompt_token_ids)
        if cfg.method == "none":
            return Plan(prompt_token_ids, ApproxStats("none", False, n, n))
        self.check_supported(cfg.method)
        budget = _budget(cfg)
        if budget is not None and n <= budget:
            return Plan(
                prompt_token_ids,
                ApproxStats(cfg.method, False, n, n, reason="prompt_within_budget"),
            )
        try:
            return await self._handlers[cfg.method](prompt_token_ids, sampling_params, cfg,
                                                     request_id)
        except DraftFailure as e:
            self.draft_failures += 1
            if self.on_draft_failure == "error":
                from vllm.exceptions import RetryableRequestError

                raise RetryableRequestError(
                    f"the draft model failed for approx.method {cfg.method} ({e}); retry, or "
                    "use approx.method none") from None
            return Plan(prompt_token_ids, ApproxStats(cfg.method, False, n, n,
                                                      reason="draft_failed", fallback=e.kind))

"""The draft-model scheduler: the pipeline step between "request accepted" and "target engine
generates".

For every request it decides, from the request's validated ``approx`` settings, what the
target engine is handed: the prompt as is (full attention, or a prompt within budget), or an
approximated request prepared by :class:`~.pipeline.MethodPipeline`. It returns a
:class:`Plan` (the prompt and sampling parameters for the target, plus the statistics that end
up in ``usage.approx``). It never generates the user's answer itself: the target engine does.

Which methods a server offers follows from the registry and the policies' facts: every
registered method whose needs the server's engines meet (a draft engine for a method that
needs one).

When the draft fails or times out (:class:`DraftFailure`), the server's ``on_draft_failure``
policy decides, here and nowhere else: ``fallback`` serves the prompt as is (full attention;
``usage.approx.fallback`` names the failure) and ``error`` answers 503 (vLLM's
``RetryableRequestError``), so that a sick draft never turns into a hung or broken request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from specapprox_vllm.frontend.draft_runner import DraftFailure
from specapprox_vllm.policies import POLICIES, ApproxConfig, Policy, build_policy

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
    # where the lookahead D came from: "self" (the answer's own first tokens, streamed),
    # "target" (a greedy run on the target engine), "draft" (the draft engine)
    lookahead_source: str | None = None
    # the budgets applied to this prompt (a ratio resolved against its length); omitted for
    # a method without that budget
    kv_budget: int | None = None
    prompt_budget: int | None = None
    # KV-compressing methods only (omitted otherwise):
    score_ms: float | None = None  # the target's scoring request (prefill of P + D), wall
    kv_blocks_before: int | None = None  # KV blocks the served prompt would hold uncompressed
    kv_blocks_after: int | None = None  # blocks the decode request held at admission (engine)
    kv_bytes_saved: int | None = None  # (before - after) blocks, in bytes of the target's KV
    kv_loads: int | None = None  # compacted-KV loads (> 1: preempted and reloaded)

    @property
    def kept_fraction(self) -> float:
        """The share of the prompt the target kept: KV entries per layer and KV head when the
        KV was compressed, else prompt tokens (1.0 when nothing was dropped)."""
        kept = self.kv_entries_kept if self.kv_entries_kept is not None \
            else self.prompt_tokens_kept
        return kept / self.prompt_tokens_in if self.prompt_tokens_in else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()
                if v is not None or k in ("kv_entries_kept",)}


@dataclass
class Lookahead:
    """The first phase of a self-drafted request: the user's prompt, served by the target
    with ``sampling_params`` (the user's, with ``max_tokens = n + 1`` and the KV-compaction
    flag); its tokens go to the client as they come (they are the exact answer).
    ``resume(final_output, token_ids)`` then gives the plan of the rest (the decode request
    on the compacted KV), or None when the answer ended within the lookahead."""

    sampling_params: Any
    request_id: str
    resume: Callable[[Any, list[int]], Awaitable[Plan | None]]


@dataclass
class Plan:
    """What the target engine is asked to serve for one request.

    ``sampling_params`` / ``cache_salt`` replace the user's when set (SpecKV's decode
    request); ``on_output`` sees the final engine output (engine-side KV accounting), and
    ``release`` is awaited once the target request has ended, however it ended. With a
    ``lookahead``, the target first serves that phase, and ``prompt_token_ids`` is the
    user's prompt.
    """

    prompt_token_ids: list[int]
    stats: ApproxStats
    extra: dict[str, Any] = field(default_factory=dict)
    sampling_params: Any | None = None
    cache_salt: str | None = None
    on_output: Callable[[Any], None] | None = None
    release: Callable[[], Awaitable[None]] | None = None
    lookahead: Lookahead | None = None
    # the user's prompt tokens the prefix cache served (the scoring request's hits), which
    # the outputs report as ``num_cached_tokens`` instead of the decode request's own
    cached_tokens: int | None = None


class DraftScheduler:
    """Plans each request with ``pipeline`` (a :class:`~.pipeline.MethodPipeline`, or any
    callable ``(policy, prompt_ids, sampling_params, request_id, cache_salt=None) -> Plan`` with a
    ``has_draft`` attribute and a ``check(policy)`` method; None: full attention only)."""

    def __init__(self, pipeline: Any | None = None, on_draft_failure: str = "fallback"
                 ) -> None:
        if on_draft_failure not in DRAFT_FAILURE_POLICIES:
            raise ValueError(f"on_draft_failure: {on_draft_failure!r} is not one of "
                             f"{', '.join(DRAFT_FAILURE_POLICIES)}")
        self.pipeline = pipeline
        self.on_draft_failure = on_draft_failure
        self.draft_failures = 0

    def can_serve(self, policy_cls: type[Policy]) -> bool:
        """Full attention always; an approximation when the pipeline exists, and has a draft
        engine if the method needs one."""
        if not (policy_cls.compresses_prompt or policy_cls.compresses_kv):
            return True
        return self.pipeline is not None and (not policy_cls.needs_draft
                                              or self.pipeline.has_draft)

    @property
    def supported_methods(self) -> tuple[str, ...]:
        return tuple(name for name, cls in POLICIES.items() if self.can_serve(cls))

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
        if self.pipeline is not None:
            self.pipeline.check(build_policy(cfg))

    async def plan(
        self, prompt_token_ids: list[int], sampling_params: Any, cfg: ApproxConfig,
        request_id: str, cache_salt: str | None = None,
    ) -> Plan:
        """``cache_salt``: the user's, which the draft and scoring requests carry too."""
        n = len(prompt_token_ids)
        cfg = cfg.for_prompt(n)  # ratios become budgets here, once the prompt is known
        plan = await self._plan(prompt_token_ids, sampling_params, cfg, request_id, cache_salt)
        for key, value in cfg.budgets().items():
            setattr(plan.stats, key, value)
        return plan

    async def _plan(
        self, prompt_token_ids: list[int], sampling_params: Any, cfg: ApproxConfig,
        request_id: str, cache_salt: str | None,
    ) -> Plan:
        n = len(prompt_token_ids)
        policy = build_policy(cfg)
        if not (policy.compresses_prompt or policy.compresses_kv):
            return Plan(prompt_token_ids, ApproxStats(cfg.method, False, n, n))
        self.check_supported(cfg.method)
        if not policy.applies(n):
            return Plan(prompt_token_ids,
                        ApproxStats(cfg.method, False, n, n, reason="prompt_within_budget"))
        try:
            return await self.pipeline(policy, prompt_token_ids, sampling_params, request_id,
                                       cache_salt=cache_salt)
        except DraftFailure as e:
            self.draft_failures += 1
            if self.on_draft_failure == "error":
                from vllm.exceptions import RetryableRequestError

                raise RetryableRequestError(
                    f"the draft model failed for approx.method {cfg.method} ({e}); retry, or "
                    "use approx.method none") from None
            return Plan(prompt_token_ids, ApproxStats(cfg.method, False, n, n,
                                                      reason="draft_failed", fallback=e.kind))

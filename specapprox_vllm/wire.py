"""What travels between the API process and vLLM's engine processes, in one small module.

Both sides import this module and :mod:`specapprox_vllm.policies`; neither imports the other's
code (the API process never imports ``specapprox_vllm.worker``). A flagged request carries a
:class:`ScoringSpec` in ``SamplingParams.extra_args`` under :data:`PROMPT_SCORES_KEY` (draft
engine: score the prompt) or :data:`KV_COMPACTION_KEY` (target engine: score and compact its
KV); the spec carries the method's validated settings, and the worker rebuilds the policy from
the registry and calls its hooks. Results come back through ``collective_rpc`` calls of the
worker extension (:data:`RPC`), and the compacted KV is loaded into a decode request by the KV
connector, named by :data:`LOAD_KEY` in ``kv_transfer_params``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from specapprox_vllm.policies import Policy, build_policy, make_approx_config

PROMPT_SCORES_KEY = "specapprox_capture"
KV_COMPACTION_KEY = "specapprox_kv"
LOAD_KEY = "specapprox_load"  # kv_transfer_params of a decode request: the stored entry's key
REPORT_KEY = "specapprox"  # kv_transfer_params of a finished decode request: the engine's report
# extra_args of a decode request with penalties: the prompt and earlier outputs they count
# (the decode request's own prompt is placeholders; specapprox_vllm/worker/penalties.py)
PENALTY_KEY = "specapprox_penalties"

WORKER_EXTENSION = "specapprox_vllm.worker.extension.SpecApproxWorkerExtension"
CONNECTOR_CONFIG: dict[str, str] = {
    "kv_connector": "SpecApproxConnector",
    "kv_connector_module_path": "specapprox_vllm.worker.kv_connector",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "fail",  # never recompute placeholders as if they were P
}


class RPC:
    """Names of the worker-extension methods the API process calls with ``collective_rpc``."""

    POP_PROMPT_SCORES = "specapprox_pop_captures"
    PROMPT_SCORE_COUNT = "specapprox_capture_count"
    KV_RESULTS = "specapprox_kv_results"
    KV_DROP = "specapprox_kv_drop"
    KV_STORE_INFO = "specapprox_kv_store_info"
    TRIM_MEMORY = "specapprox_trim_memory"
    KV_SUPPORT = "specapprox_kv_support"


@dataclass
class ScoringSpec:
    """One flagged request: whose scores (``key``), which method with which settings, and
    the shape of its sequence ``P + D`` (``prompt_len`` = ``L``, ``n_draft`` = ``n``)."""

    key: str
    method: str
    config: dict[str, Any]
    prompt_len: int
    n_draft: int
    want_indices: bool = False  # KV compaction: also report the kept positions (tests)
    _policy: Policy | None = field(default=None, repr=False, compare=False)

    @classmethod
    def for_policy(cls, key: str, policy: Policy, prompt_len: int, n_draft: int,
                   want_indices: bool = False) -> ScoringSpec:
        return cls(key, policy.name, policy.cfg.model_dump(), prompt_len, n_draft, want_indices)

    def to_extra(self) -> dict[str, Any]:
        out = asdict(self)
        del out["_policy"]
        return out

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> ScoringSpec:
        return cls(**extra)

    @property
    def policy(self) -> Policy:
        """The method's policy, rebuilt from the registry once per spec."""
        if self._policy is None:
            self._policy = build_policy(make_approx_config(self.method, self.config))
        return self._policy

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.n_draft

    def scoring_rows(self, kind: str) -> range:
        """Positions whose queries the scores need: the policy's ``kv_rows`` for
        :data:`KV_COMPACTION_KEY`, its ``prompt_rows`` for :data:`PROMPT_SCORES_KEY`."""
        p = self.policy
        if kind == KV_COMPACTION_KEY:
            return p.kv_rows(self.prompt_len, self.n_draft)
        return p.prompt_rows(self.prompt_len, self.n_draft)


def token_prompt(ids: list[int], cache_salt: str | None = None) -> dict[str, Any]:
    """The engine prompt of an internal request (draft run, scoring request) over token ids,
    under the user's ``cache_salt`` if any: it reads and publishes prefix blocks only where the
    user's own requests may."""
    return {"prompt_token_ids": ids, **({"cache_salt": cache_salt} if cache_salt else {})}


def prefix_cache_cap(extra_args: dict[str, Any] | None) -> int | None:
    """How many leading tokens a flagged request may read from the prefix cache: those before
    its first scoring row, whose query it must compute (None: not flagged, or no rows score).
    Why: a hit over the scoring rows used to cost a second prefill of the whole prompt
    without the cache; capped, a repeated document (the next turn of a conversation) is still
    read from the cache and only the tail from the first scoring row on is recomputed."""
    for kind in (KV_COMPACTION_KEY, PROMPT_SCORES_KEY):
        if extra_args and kind in extra_args:
            rows = ScoringSpec.from_extra(extra_args[kind]).scoring_rows(kind)
            return rows.start if len(rows) else None
    return None

"""Per-request records and the statistics of one load-test run.

The definitions follow ``vllm bench serve`` (vllm/benchmarks/serve.py, ``calculate_metrics``)
so that numbers from the two tools can be compared side by side:

* TTFT: request sent -> first chunk that carries generated text.
* TPOT (per request): ``(t_last_token - ttft) / (output_tokens - 1)``, only for requests with
  more than one output token; for goodput a request with <= 1 token counts as TPOT 0.
* ITL: the gaps between consecutive text-carrying chunks, pooled over all requests.
* E2E: request sent -> response fully received (vLLM's E2EL stops at the last token chunk;
  the difference is the trailing usage chunk, typically well under a millisecond).
* Percentiles interpolate linearly between closest ranks (numpy's default method).

Token counts come from the server's ``usage`` (prompt and completion tokens), never from
counting chunks, because a chunk may carry several tokens.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES = (50.0, 90.0, 99.0)
GOODPUT_KEYS = ("ttft", "tpot", "e2el")
APPROX_NUMERIC = ("prompt_tokens_in", "prompt_tokens_kept", "kv_entries_kept", "draft_tokens",
                  "draft_ms", "select_ms")


@dataclass
class RequestRecord:
    """What one request did. Times are seconds, relative to the request's own start."""

    index: int
    setting: str
    success: bool = False
    status: int | None = None          # HTTP status; None when no response arrived
    error_type: str | None = None      # OpenAI error.type, or the exception class name
    error: str | None = None
    start: float = 0.0                 # seconds since the run started
    ttft: float | None = None
    e2e: float | None = None
    last_token: float | None = None    # time of the last text-carrying chunk
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    expected_output_tokens: int | None = None
    approx: dict[str, Any] | None = None
    text: str = ""

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None when it is undefined."""
        n = self.completion_tokens
        if n is None or n <= 1 or self.ttft is None or self.last_token is None:
            return None
        return (self.last_token - self.ttft) / (n - 1)

    def to_json(self, keep_text: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["tpot"] = self.tpot
        if not keep_text:
            d.pop("text")
        return d


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (``numpy.percentile``'s default)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    rank = (len(xs) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def describe(values_s: list[float]) -> dict[str, float | None]:
    """mean / std / median / p90 / p99 in milliseconds (None when there are no values)."""
    if not values_s:
        return {"count": 0, "mean": None, "std": None, "median": None, "p90": None, "p99": None}
    ms = [v * 1000.0 for v in values_s]
    mean = sum(ms) / len(ms)
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / len(ms))
    return {"count": len(ms), "mean": mean, "std": std, "median": percentile(ms, 50.0),
            "p90": percentile(ms, 90.0), "p99": percentile(ms, 99.0)}


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    out: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in GOODPUT_KEYS:
            raise ValueError(f"--goodput takes KEY:MS with KEY in {GOODPUT_KEYS}, got {item!r}")
        ms = float(value)
        if ms <= 0:
            raise ValueError(f"--goodput {key} must be > 0 ms, got {value}")
        out[key] = ms
    return out


def is_good(rec: RequestRecord, slo_ms: dict[str, float]) -> bool:
    """A successful request that meets every SLO (vLLM's rule: TPOT of a <=1-token reply is 0;
    a missing TTFT, as in non-streamed requests, cannot meet a TTFT SLO)."""
    if not rec.success:
        return False
    values = {"ttft": rec.ttft, "tpot": rec.tpot if rec.tpot is not None else 0.0,
              "e2el": rec.e2e}
    for key, limit in slo_ms.items():
        v = values[key]
        if v is None or v * 1000.0 > limit:
            return False
    return True


def aggregate_approx(records: list[RequestRecord]) -> dict[str, Any]:
    """Sums and means of ``usage.approx`` over the successful requests that reported it."""
    rows = [r.approx for r in records if r.success and isinstance(r.approx, dict)]
    out: dict[str, Any] = {"reported": len(rows),
                           "methods": dict(Counter(str(a.get("method")) for a in rows)),
                           "applied": sum(1 for a in rows if a.get("applied")),
                           "reasons": dict(Counter(a["reason"] for a in rows if a.get("reason")))}
    for key in APPROX_NUMERIC:
        vals = [float(a[key]) for a in rows if isinstance(a.get(key), (int, float))
                and not isinstance(a.get(key), bool)]
        out[key] = {"sum": sum(vals), "mean": (sum(vals) / len(vals)) if vals else None,
                    "p99": percentile(vals, 99.0) if vals else None, "count": len(vals)}
    tin, tkept = out["prompt_tokens_in"]["sum"], out["prompt_tokens_kept"]["sum"]
    out["prompt_kept_ratio"] = (tkept / tin) if tin else None
    return out


def failure_breakdown(records: list[RequestRecord]) -> dict[str, Any]:
    """Failed requests counted by HTTP status and by error type."""
    failed = [r for r in records if not r.success]
    return {"by_status": dict(Counter(str(r.status) if r.status is not None else "no_response"
                                      for r in failed)),
            "by_type": dict(Counter(r.error_type or "unknown" for r in failed)),
            "examples": [{"status": r.status, "type": r.error_type, "error": (r.error or "")[:300]}
                         for r in failed[:3]]}


def summarize(records: list[RequestRecord], duration_s: float,
              slo_ms: dict[str, float] | None = None) -> dict[str, Any]:
    """The numbers of the printed block and of the summary JSON, for one setting."""
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_tokens or 0 for r in ok)
    total_out = sum(r.completion_tokens or 0 for r in ok)
    dur = max(duration_s, 1e-9)
    summary: dict[str, Any] = {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "usage_missing": sum(1 for r in ok if r.completion_tokens is None),
        "request_throughput": len(ok) / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "ttft_ms": describe([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": describe([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": describe([g for r in ok for g in r.itl]),
        "e2el_ms": describe([r.e2e for r in ok if r.e2e is not None]),
        "failures": failure_breakdown(records),
        "approx": aggregate_approx(records),
    }
    if slo_ms:
        good = sum(1 for r in records if is_good(r, slo_ms))
        summary["goodput"] = {"slo_ms": slo_ms, "good_requests": good,
                              "request_goodput": good / dur}
    return summary

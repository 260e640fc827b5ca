"""Bookkeeping and invariants of the soak test (:mod:`.soak`, issue 8 part 6).

Why a module of its own: this is the part that decides pass or fail, so it is pure (no
server, no I/O) and unit-tested with synthetic events (tests/test_soak.py); the script only
sends requests and reads ``GET /specapprox/state``.

Outcomes: every request sent gets exactly one terminal outcome, ``ok`` (a full reply: one
``finish_reason`` per choice, usage, ``[DONE]`` for streams), ``cancelled`` (abandoned on
purpose), ``rejected`` (an invalid request's expected 400), ``throttled`` (429 with
Retry-After: allowed) or ``unexpected`` (anything else: 5xx, connection error, timeout, a
broken stream, an invalid request accepted).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from specapprox_vllm.tools.loadtest.stats import percentile

OUTCOMES = ("ok", "cancelled", "rejected", "throttled", "unexpected")
MIB = 1024 * 1024


class Result(NamedTuple):
    outcome: str
    status: int | None = None
    detail: str = ""
    retry_after: float | None = None


@dataclass
class Record:
    """One request: what was drawn and its terminal outcome (times in s since the start)."""

    rid: int
    kind: str                 # a method, or "invalid"
    mode: str                 # plain | stream | cancel | one of INVALID_CASES
    start: float
    outcome: str | None = None
    status: int | None = None
    latency: float | None = None
    detail: str = ""


class Ledger:
    """Every request sent and every terminal outcome reported for it."""

    def __init__(self) -> None:
        self.sent: dict[int, Record] = {}
        self.finishes: Counter[int] = Counter()

    def send(self, rec: Record) -> None:
        if rec.rid in self.sent:
            raise ValueError(f"request {rec.rid} sent twice")
        self.sent[rec.rid] = rec

    def finish(self, rid: int, res: Result, latency: float) -> None:
        if res.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {res.outcome!r}")
        self.finishes[rid] += 1
        rec = self.sent[rid]
        if rec.outcome is None:  # a second outcome is counted in finishes, never overwrites
            rec.outcome, rec.status, rec.latency, rec.detail = (
                res.outcome, res.status, latency, res.detail[:300])

    def lost(self) -> list[int]:
        return [rid for rid in self.sent if not self.finishes[rid]]

    def duplicated(self) -> list[int]:
        return [rid for rid, n in self.finishes.items() if n > 1]

    def counts(self, kind: str | None = None) -> dict[str, int]:
        recs = [r for r in self.sent.values() if kind is None or r.kind == kind]
        c = Counter(r.outcome for r in recs)
        return {"sent": len(recs), **{o: c[o] for o in OUTCOMES}}

    def by_kind(self) -> dict[str, dict[str, Any]]:
        """Counts and p50/p95 latency (ms, of ok and rejected requests) per kind."""
        out = {}
        for kind in sorted({r.kind for r in self.sent.values()}):
            lat = [r.latency * 1e3 for r in self.sent.values() if r.kind == kind
                   and r.outcome in ("ok", "rejected") and r.latency is not None]
            out[kind] = {**self.counts(kind),
                         "p50_ms": percentile(lat, 50) if lat else None,
                         "p95_ms": percentile(lat, 95) if lat else None,
                         "modes": dict(Counter(r.mode for r in self.sent.values()
                                               if r.kind == kind))}
        return out


def check_stream(payloads: list[str], n_choices: int = 1) -> str | None:
    """Why a streamed reply (its SSE ``data:`` payloads in order) breaks the contract, or None:
    JSON chunks without errors, exactly one ``finish_reason`` per choice and no text after it,
    one usage chunk (``include_usage``), then ``[DONE]``, last."""
    if "[DONE]" not in payloads:
        return "stream ended without [DONE]"
    if payloads.index("[DONE]") != len(payloads) - 1:
        return "data after [DONE]"
    finishes: Counter[int] = Counter()
    usage = 0
    for p in payloads[:-1]:
        try:
            obj = json.loads(p)
        except json.JSONDecodeError:
            return f"chunk is not JSON: {p[:100]!r}"
        if not isinstance(obj, dict) or "error" in obj:
            return f"error chunk: {p[:200]}"
        for ch in obj.get("choices") or []:
            i = ch.get("index", 0)
            if finishes[i] and (ch.get("delta") or {}).get("content"):
                return f"text after finish_reason (choice {i})"
            finishes[i] += ch.get("finish_reason") is not None
        usage += obj.get("usage") is not None
    if any(finishes[i] != 1 for i in range(n_choices)) or set(finishes) - set(range(n_choices)):
        return f"finish_reason chunks per choice: {dict(finishes)}"
    return None if usage == 1 else f"{usage} usage chunks (include_usage asks for one)"


def check_response(obj: Mapping[str, Any], method: str) -> str | None:
    """Why a non-streamed chat completion breaks the contract, or None."""
    choices = obj.get("choices") or []
    if not choices or any(c.get("finish_reason") is None for c in choices):
        return "no choice, or a choice without finish_reason"
    approx = (obj.get("usage") or {}).get("approx")
    if not isinstance(approx, dict) or approx.get("method") != method:
        return f"usage.approx is {approx!r}, expected method {method!r}"
    return None


def classify_error(status: int, headers: Mapping[str, str], body: str,
                   expect_reject: bool) -> Result:
    """The outcome of a non-200 answer."""
    if status == 429:
        try:
            return Result("throttled", 429, "", max(0.0, float(headers["retry-after"])))
        except (KeyError, ValueError):
            return Result("unexpected", 429, "429 without a valid Retry-After")
    if expect_reject and status == 400:
        try:
            err = json.loads(body)["error"]
            return Result("rejected", 400, str(err["message"])[:200])
        except (ValueError, KeyError, TypeError):
            return Result("unexpected", 400, f"400 not in OpenAI's error shape: {body[:200]}")
    return Result("unexpected", status, f"HTTP {status}: {body[:300]}")


def state_value(state: Mapping[str, Any] | None, *keys: str) -> Any:
    """``state[k1][k2]...``, or None where a level is missing."""
    cur: Any = state
    for k in keys:
        cur = cur.get(k) if isinstance(cur, Mapping) else None
    return cur


def state_checks(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The end-state invariants (``after``) against the idle baseline (``before``)."""
    engines = after.get("engines") or {}
    alive = bool(after.get("healthy")) and bool(engines) and all(
        e.get("alive") for e in engines.values())
    kv_bad = []
    for name in sorted(set(engines) | set(before.get("engines") or {})):
        used = state_value(after, "engines", name, "kv_blocks_used")
        base = state_value(before, "engines", name, "kv_blocks_used")
        if not isinstance(used, int) or used > (base if isinstance(base, int) else 0):
            kv_bad.append(f"{name}: {used} (baseline {base})")
    entries = state_value(after, "compacted_kv", "entries")
    captures = after.get("draft_captures")
    active = state_value(after, "admission", "active")
    queued = state_value(after, "admission", "queued")
    return {
        "engines_alive": {"ok": alive, "detail": f"healthy={after.get('healthy')}, alive="
                          f"{ {n: e.get('alive') for n, e in engines.items()} }"},
        "kv_blocks_idle": {"ok": not kv_bad, "detail": "; ".join(kv_bad) or "back to baseline"},
        "compacted_kv_empty": {"ok": entries == 0, "detail": f"entries={entries}"},
        "draft_captures_empty": {  # null when the server has no draft engine
            "ok": captures == 0 or (captures is None and "draft" not in engines),
            "detail": f"draft_captures={captures}"},
        "admission_idle": {"ok": active == 0 and queued == 0,
                           "detail": f"active={active}, queued={queued}"},
    }


def rss_floors(series: list[list[float]], warm_t: float | None, window_s: float
               ) -> tuple[int | None, int | None]:
    """RSS floors ``(after warm-up, at the end)``: the least sample in the first and in the last
    ``window_s`` after the warm-up.

    Why floors and not two samples: the server trims its heaps every ~30 s, so RSS is a saw
    tooth hundreds of MB high, and two single samples measure where in the tooth they fell
    (the first 20-minute record read +839 MiB that way, and could as well have read +60).
    A window of two trim intervals holds at least one post-trim sample."""
    if warm_t is None:
        return None, None
    after = [(t, int(b)) for t, b in series if t >= warm_t]
    if not after:
        return None, None
    t_end = after[-1][0]
    window_s = min(window_s, max((t_end - warm_t) / 2, 0.0))
    first = [b for t, b in after if t <= warm_t + window_s]
    last = [b for t, b in after if t >= t_end - window_s]
    return min(first), min(last)


def check_invariants(ledger: Ledger, before: Mapping[str, Any], after: Mapping[str, Any],
                     warm_rss: int | None, max_growth_mb: float,
                     end_rss: int | None = None) -> dict[str, dict[str, Any]]:
    """Every invariant as ``{"ok": bool, "detail": str}``. ``warm_rss``/``end_rss``: RSS after
    the warm-up and at the end (floors from :func:`rss_floors`; ``end_rss`` defaults to the
    final state's)."""
    c, lost, dup = ledger.counts(), ledger.lost(), ledger.duplicated()
    done = sum(c[o] for o in OUTCOMES)
    if end_rss is None:
        end_rss = state_value(after, "process", "rss_bytes")
    if warm_rss is None or not isinstance(end_rss, int):
        rss = {"ok": False, "detail": f"no RSS pair (warm-up end {warm_rss}, end {end_rss}); "
                                      "the warm-up needs >= 30 s and one request of each kind"}
    else:
        growth = (end_rss - warm_rss) / MIB
        rss = {"ok": growth <= max_growth_mb,
               "detail": f"{growth:+.1f} MiB after warm-up (limit {max_growth_mb})"}
    return {
        "one_terminal_outcome": {"ok": not lost and not dup, "detail": f"{len(lost)} without "
                                 f"an outcome {lost[:10]}, {len(dup)} with several {dup[:10]}"},
        "no_unexpected": {"ok": c["unexpected"] == 0, "detail": f"{c['unexpected']} unexpected"},
        "no_lost_requests": {"ok": c["sent"] == done, "detail": f"sent {c['sent']}, terminal "
                             f"{done} (" + ", ".join(f"{o} {c[o]}" for o in OUTCOMES) + ")"},
        **state_checks(before, after),
        "rss_growth": rss,
    }



def rate_series(ledger: Ledger, bin_s: float) -> list[list[float]]:
    """Terminal outcomes per second, per ``bin_s`` bin of completion time."""
    ends = [r.start + r.latency for r in ledger.sent.values() if r.latency is not None]
    n = Counter(int(e // bin_s) for e in ends)
    return [[i * bin_s, n[i] / bin_s] for i in range(max(n) + 1)] if n else []


def format_table(by_kind: dict[str, dict[str, Any]]) -> str:
    cols = ("sent", *OUTCOMES)
    lines = [f"{'kind':<14}" + "".join(f"{c:>11}" for c in cols) + f"{'p50 ms':>9}{'p95 ms':>9}"]
    for kind, row in [*by_kind.items(), ("total", None)]:
        if row is None:
            row = {c: sum(r[c] for r in by_kind.values()) for c in cols}
        lat = "".join(f"{row[k]:>9.0f}" if row.get(k) is not None else f"{'-':>9}"
                      for k in ("p50_ms", "p95_ms"))
        lines.append(f"{kind:<14}" + "".join(f"{row[c]:>11}" for c in cols) + lat)
    return "\n".join(lines)

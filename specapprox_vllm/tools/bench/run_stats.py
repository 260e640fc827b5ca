"""What one concurrent run of the methods benchmark measured (:mod:`.speckv`): the server's
``/metrics`` sampled while it runs, and the summary of its request records.

Pure client code: nothing here names a method or starts a server.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from specapprox_vllm.tools.loadtest.stats import RequestRecord, percentile

# /metrics series sampled during the runs: key -> (sample name, labels that must match)
SERIES = {"running": ("specapprox_engine_requests_running", {"engine": "target"}),
          "waiting": ("specapprox_engine_queue_depth", {"engine": "target"}),
          "kv_used_blocks": ("specapprox_engine_kv_blocks", {"engine": "target", "state": "used"}),
          "kv_total_blocks": ("specapprox_engine_kv_blocks",
                              {"engine": "target", "state": "total"}),
          "draft_running": ("specapprox_engine_requests_running", {"engine": "draft"}),
          "vllm_running": ("vllm:num_requests_running", {}),
          "vllm_kv_usage": ("vllm:kv_cache_usage_perc", {}),
          "preemptions": ("vllm:num_preemptions_total", {})}


def parse_metrics(text: str) -> dict[str, float]:
    """The ``SERIES`` values of one /metrics scrape (sums over the other labels)."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            for key, (name, labels) in SERIES.items():
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    out[key] = out.get(key, 0.0) + float(s.value)
    return out


async def poll_metrics(client: httpx.AsyncClient, url: str, t0: float, period: float,
                       samples: list[dict[str, float]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            r = await client.get(url)
            samples.append({"t": round(time.perf_counter() - t0, 3), **parse_metrics(r.text)})
        except httpx.HTTPError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), period)
        except asyncio.TimeoutError:
            pass

def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant (sweep over start/end events)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals],
                    key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def med(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize(recs: list[RequestRecord], wall: float, samples: list[dict[str, float]],
              max_tokens: int) -> dict[str, Any]:
    ok = [r for r in recs if r.success and r.ttft is not None and r.last_token is not None]
    toks = [r.completion_tokens or 0 for r in ok]
    first = [r.start + r.ttft for r in ok]  # type: ignore[operator]
    last = [r.start + r.last_token for r in ok]  # type: ignore[operator]
    decode_span = (max(last) - min(first)) if ok else 0.0
    ttft = [r.ttft for r in ok if r.ttft is not None]
    per_req = [(n - 1) / (b - a) for n, a, b in zip(toks, first, last, strict=True) if b > a]

    def peak(key: str) -> float | None:
        vals = [s[key] for s in samples if key in s]
        return (int(max(vals)) if max(vals).is_integer() else max(vals)) if vals else None

    pre = [int(s["preemptions"]) for s in samples if "preemptions" in s]
    approx = [r.approx for r in ok if isinstance(r.approx, dict)]

    def amed(key: str) -> float | None:
        return med([float(a[key]) for a in approx if isinstance(a.get(key), (int, float))])

    return {
        "requests_ok": len(ok), "requests_failed": len(recs) - len(ok),
        "errors": sorted({f"{r.error_type}: {r.error}"[:200] for r in recs if not r.success}),
        "prompt_tokens_median": med([float(r.prompt_tokens or 0) for r in ok]),
        "output_tokens": sum(toks), "all_max_tokens": all(t == max_tokens for t in toks),
        "wall_s": round(wall, 3), "output_tok_s": round(sum(toks) / wall, 3) if wall else None,
        "decode_tok_s": round(sum(t - 1 for t in toks) / decode_span, 3) if decode_span else None,
        "per_request_decode_tok_s_median": med(per_req),
        "ttft_p50_s": round(percentile(ttft, 50), 3) if ttft else None,
        "ttft_p90_s": round(percentile(ttft, 90), 3) if ttft else None,
        "ttft_max_s": round(max(ttft), 3) if ttft else None,
        "peak_running": peak("running"), "peak_vllm_running": peak("vllm_running"),
        "peak_waiting": peak("waiting"), "peak_kv_used_blocks": peak("kv_used_blocks"),
        "peak_draft_running": peak("draft_running"),
        "preemptions": (max(pre) - min(pre)) if pre else None,
        "peak_decoding_client": peak_overlap(list(zip(first, last, strict=True))),
        "metric_samples": len(samples),
        "approx_applied": sum(1 for a in approx if a.get("applied")),
        **{f"{k}_median": amed(k) for k in ("draft_ms", "score_ms", "select_ms",
                                            "kv_blocks_before", "kv_blocks_after",
                                            "prompt_tokens_kept")},
    }

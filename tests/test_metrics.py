"""``/metrics``: our ``specapprox_*`` series next to vLLM's.

In-process: the middleware and the engine observer against a stand-in app and engine, where
every amount is known. Live: a real server, scraped before and after real requests and parsed
with prometheus_client's own exposition parser; each series must move by exactly what the
responses (status, ``usage.approx``) say.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from server.approx_api import ApproxMiddleware
from server.engine_client import CURRENT_REQUEST
from server.metrics import MetricsMiddleware, attach_engine_observers
from specapprox_vllm.frontend.scheduler import ApproxStats, DraftScheduler
from specapprox_vllm.policies import METHODS, load_method_defaults
from tests.conftest import ROOT
from tests.server_utils import ServerProcess

DEFAULTS = load_method_defaults(ROOT / "configs" / "methods")
MODEL = "SmolLM2-135M-Instruct"


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class _Scheduler(DraftScheduler):
    """Offers none and speckv only, so specpc is a valid but unavailable method."""

    @property
    def supported_methods(self) -> tuple[str, ...]:
        return ("none", "speckv")


def _app(in_flight_seen: list[float]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        await request.json()
        in_flight_seen.append(value("specapprox_requests_in_flight", endpoint="chat"))
        ctx = CURRENT_REQUEST.get()
        if ctx.config.method == "speckv":
            ctx.stats.append(ApproxStats("speckv", True, 1000, 1000, kv_entries_kept=256,
                                         draft_tokens=8, draft_ms=12.0, select_ms=3.0))
        else:
            ctx.stats.append(ApproxStats("none", False, 40, 40))
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                             "usage": usage, "choices": []})

    return app


def test_middleware_counts_requests_and_usage_approx() -> None:
    seen: list[float] = []
    asgi = MetricsMiddleware(ApproxMiddleware(_app(seen), _Scheduler(), "none", DEFAULTS,
                                              1 << 20))
    http = TestClient(asgi, base_url="http://t")
    req = "specapprox_requests_total"
    keys = {("speckv", "2xx"), ("none", "2xx"), ("invalid", "4xx"), ("specpc", "4xx")}
    before = {k: value(req, method=k[0], endpoint="chat", status=k[1]) for k in keys}
    hist_before = value("specapprox_request_duration_seconds_count", method="speckv",
                        endpoint="chat", status="2xx")
    sums = {n: value(n, method="speckv") for n in (
        "specapprox_prompt_tokens_in_total", "specapprox_prompt_tokens_kept_total",
        "specapprox_kv_entries_kept_sum", "specapprox_kv_entries_kept_count",
        "specapprox_draft_tokens_total", "specapprox_draft_seconds_sum",
        "specapprox_select_seconds_sum", "specapprox_select_seconds_count")}
    applied = value("specapprox_engine_requests_total", method="speckv", applied="true")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    for _ in range(2):
        assert http.post("/v1/chat/completions", json={**body, "approx": {
            "method": "speckv"}}).status_code == 200
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert http.post("/v1/chat/completions", json={**body, "approx": {
        "method": "bogus"}}).status_code == 400
    assert http.post("/v1/chat/completions", json={**body, "approx": {
        "method": "specpc"}}).status_code == 400
    assert http.get("/v1/models").status_code == 404  # not a completion route: not counted

    after = {k: value(req, method=k[0], endpoint="chat", status=k[1]) for k in keys}
    assert {k: after[k] - before[k] for k in keys} == {
        ("speckv", "2xx"): 2, ("none", "2xx"): 1, ("invalid", "4xx"): 1, ("specpc", "4xx"): 1}
    assert value("specapprox_request_duration_seconds_count", method="speckv", endpoint="chat",
                 status="2xx") - hist_before == 2
    moved = {n: value(n, method="speckv") - v for n, v in sums.items()}
    assert moved == pytest.approx({
        "specapprox_prompt_tokens_in_total": 2000, "specapprox_prompt_tokens_kept_total": 2000,
        "specapprox_kv_entries_kept_sum": 512, "specapprox_kv_entries_kept_count": 2,
        "specapprox_draft_tokens_total": 16, "specapprox_draft_seconds_sum": 0.024,
        "specapprox_select_seconds_sum": 0.006, "specapprox_select_seconds_count": 2})
    assert value("specapprox_engine_requests_total", method="speckv", applied="true") \
        - applied == 2
    assert seen == [1.0, 1.0, 1.0]  # in flight while being served ...
    assert value("specapprox_requests_in_flight", endpoint="chat") == 0  # ... and 0 after


def test_engine_observer_mirrors_scheduler_stats() -> None:
    loggers: list = []
    engine = SimpleNamespace(
        logger_manager=SimpleNamespace(stat_loggers=loggers),
        vllm_config=SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=101)))
    attach_engine_observers({"draft": engine, "target": SimpleNamespace(logger_manager=None)})
    attach_engine_observers({"draft": engine})  # idempotent: one observer per engine
    assert len(loggers) == 1
    stats = SimpleNamespace(num_waiting_reqs=3, num_skipped_waiting_reqs=1, num_running_reqs=2,
                            kv_cache_usage=0.25)
    loggers[0].record(stats, None, engine_idx=0)
    assert value("specapprox_engine_queue_depth", engine="draft") == 4
    assert value("specapprox_engine_requests_running", engine="draft") == 2
    assert value("specapprox_engine_kv_cache_usage_ratio", engine="draft") == 0.25
    blocks = {s: value("specapprox_engine_kv_blocks", engine="draft", state=s)
              for s in ("total", "used", "free")}
    assert blocks == {"total": 100, "used": 25, "free": 75}  # block 0 is vLLM's null block
    assert value("specapprox_engine_stats_observed", engine="draft") == 1
    assert value("specapprox_engine_stats_observed", engine="target") == 0


# ---------------------------------------------------------------- against the real server


def scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` parsed from the exposition text."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.server
@pytest.mark.timeout(900)
def test_live_metrics_move_by_what_the_responses_say(live_server: ServerProcess) -> None:
    url = live_server.base_url
    before = scrape(url)
    # vLLM's own engine series are still served next to ours.
    assert any(k[0] == "vllm:num_requests_waiting" for k in before)
    prompt = "Tell me about the sea. " * 20
    expected: dict[tuple[str, str, str], int] = {}
    tokens_in: dict[str, int] = {}
    tokens_kept: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=600) as c:
        def send(endpoint: str, approx: dict | None, stream: bool = False) -> None:
            body: dict = {"model": MODEL, "max_tokens": 4, "temperature": 0}
            if endpoint == "chat":
                path, body["messages"] = "/v1/chat/completions", [
                    {"role": "user", "content": prompt}]
            else:
                path, body["prompt"] = "/v1/completions", prompt
            if approx is not None:
                body["approx"] = approx
            if stream:
                body.update(stream=True, stream_options={"include_usage": True})
            r = c.post(path, json=body)
            method = (approx or {}).get("method", "none")
            label = method if method in METHODS else "invalid"
            key = (label, endpoint, f"{r.status_code // 100}xx")
            expected[key] = expected.get(key, 0) + 1
            if r.status_code != 200:
                return
            if stream:
                usage = [json.loads(line[6:]) for line in r.text.splitlines()
                         if line.startswith("data: {") and '"usage":{' in line][-1]["usage"]
            else:
                usage = r.json()["usage"]
            a = usage["approx"]
            tokens_in[a["method"]] = tokens_in.get(a["method"], 0) + a["prompt_tokens_in"]
            tokens_kept[a["method"]] = tokens_kept.get(a["method"], 0) + a["prompt_tokens_kept"]

        send("chat", None)
        send("chat", {"method": "none"}, stream=True)
        send("completions", {"method": "none"})
        send("chat", {"method": "bogus"})
        for method in METHODS[1:]:  # 200 where the method is live, 400 where it is not
            send("chat", {"method": method})

        # In flight and engine gauges while a streamed request is being decoded.
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 64, "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            for _ in range(6):  # a few decode steps, so the engine has reported stats
                next(lines)
            during = scrape(url)
            rest = list(lines)
        usage = [json.loads(line[6:]) for line in rest
                 if line.startswith("data: {") and '"usage":{' in line][-1]["usage"]["approx"]
        tokens_in["none"] += usage["prompt_tokens_in"]
        tokens_kept["none"] += usage["prompt_tokens_kept"]
        expected[("none", "chat", "2xx")] = expected.get(("none", "chat", "2xx"), 0) + 1
    after = scrape(url)

    for (method, endpoint, status), n in expected.items():
        labels = dict(method=method, endpoint=endpoint, status=status)
        assert get(after, "specapprox_requests_total", **labels) - get(
            before, "specapprox_requests_total", **labels) == n, labels
        assert get(after, "specapprox_request_duration_seconds_count", **labels) - get(
            before, "specapprox_request_duration_seconds_count", **labels) == n, labels
    for method, n in tokens_in.items():
        assert get(after, "specapprox_prompt_tokens_in_total", method=method) - get(
            before, "specapprox_prompt_tokens_in_total", method=method) == n
        assert get(after, "specapprox_prompt_tokens_kept_total", method=method) - get(
            before, "specapprox_prompt_tokens_kept_total", method=method) == tokens_kept[method]
    assert get(during, "specapprox_requests_in_flight", endpoint="chat") == 1
    assert get(after, "specapprox_requests_in_flight", endpoint="chat") == 0
    assert get(during, "specapprox_engine_stats_observed", engine="target") == 1
    total = get(during, "specapprox_engine_kv_blocks", engine="target", state="total")
    used = get(during, "specapprox_engine_kv_blocks", engine="target", state="used")
    free = get(during, "specapprox_engine_kv_blocks", engine="target", state="free")
    assert total > 0 and used >= 1 and used + free == total
    assert get(during, "specapprox_engine_requests_running", engine="target") == 1
    assert ("specapprox_engine_queue_depth", (("engine", "target"),)) in during
    engines = {dict(k[1])["engine"] for k in during if k[0] == "specapprox_engine_kv_blocks"}
    assert "target" in engines and engines <= {"target", "draft"}


# ---------------------------------------------------------------- the Grafana dashboard

DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "specapprox.json"
_SERIES = re.compile(r"\b(specapprox_[a-z_]+|vllm:[a-z_:]+)")
_BY = re.compile(r"\bby \(([^)]*)\)")
_MATCHER = re.compile(r"([a-z_]+)\s*=~?\s*\"")


def dashboard_queries() -> list[str]:
    """Every PromQL text of the dashboard: the panels' targets and the variables' queries."""
    dash = json.loads(DASHBOARD.read_text())
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        query = var.get("query")
        out.append(query["query"] if isinstance(query, dict) else query)
    return out


def query_needs(expr: str) -> tuple[set[str], set[str]]:
    """(series names, label names) that a query reads; ``le`` comes with every histogram."""
    names = set(_SERIES.findall(expr))
    labels = {x.strip() for m in _BY.findall(expr) for x in m.split(",") if x.strip()}
    labels |= set(_MATCHER.findall(expr))
    if expr.startswith("label_values("):
        labels.add(expr.rstrip(")").rsplit(",", 1)[1].strip())
    return names, labels - {"le"}


def test_dashboard_query_parser_finds_names_and_labels() -> None:
    """The parser the live check relies on, on a query written out by hand."""
    names, labels = query_needs(
        'histogram_quantile(0.5, sum by (le, method) (rate(specapprox_draft_seconds_bucket'
        '{method=~"$method",status="2xx"}[5m]))) / sum(vllm:generation_tokens_total)')
    assert names == {"specapprox_draft_seconds_bucket", "vllm:generation_tokens_total"}
    assert labels == {"method", "status"}
    assert query_needs("label_values(specapprox_requests_total, method)") == (
        {"specapprox_requests_total"}, {"method"})
    assert len(dashboard_queries()) >= 15


@pytest.mark.server
@pytest.mark.timeout(900)
def test_grafana_dashboard_queries_name_exported_series(live_server: ServerProcess) -> None:
    """Issue 20: every query of docker/grafana/dashboards/specapprox.json reads series (and
    labels) that this server exports once it has served real requests: a full-attention chat,
    a SpecKV request that compresses its KV (draft, selection, kept fraction), a streamed
    completion and a rejected request."""
    url = live_server.base_url
    prompt = "Tell me about the sea and the ships that sail on it. " * 20
    with httpx.Client(base_url=url, timeout=600) as c:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 16, "temperature": 0}
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        r = c.post("/v1/chat/completions", json={**chat, "approx": {
            "method": "speckv", "kv_budget": 64, "window": 16, "lookahead": 4}})
        assert r.status_code == 200 and r.json()["usage"]["approx"]["applied"] is True
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 8,
                                            "stream": True})
        assert r.status_code == 200
        assert c.post("/v1/chat/completions", json={**chat, "approx": {
            "method": "bogus"}}).status_code == 400
    exported: dict[str, set[str]] = {}
    for (name, labels), _ in scrape(url).items():
        exported.setdefault(name, set()).update(k for k, _ in labels)
    missing = []
    for expr in dashboard_queries():
        names, labels = query_needs(expr)
        assert names, f"no series named in {expr!r}"
        for name in names:
            if name not in exported:
                missing.append((name, expr))
        have = set().union(*(exported.get(n, set()) for n in names))
        missing += [(f"label {lab}", expr) for lab in labels - have]
    assert not missing, missing

"""Reliability of the real server (issue 8): overload, deadlines, disconnects, engine death,
graceful shutdown, CORS, request ids and prompt-free logs.

Leak checks read ``GET /specapprox/state?probe=1`` (engine KV blocks in use after a probe step,
compacted KV entries in the target's workers, SpecPC captures in the draft's) and expect the
idle values: nothing held once nothing runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import require_model
from tests.server_utils import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
TIMEOUT_S = 20.0
FILLER = ("The harbour town kept its lighthouse lit through every winter storm, and the "
          "keepers wrote the weather into a ledger each evening. ")


def chat(text: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "temperature": 0, **extra}


def long_chat(method: str, max_tokens: int = 4000, **extra: Any) -> dict[str, Any]:
    approx = {"method": method}
    if method in ("speckv", "snapkv"):
        approx["kv_budget"] = 64
    if method == "specpc":
        approx["prompt_budget"] = 128
    return chat(FILLER * 25 + "Summarise the text.", max_tokens, ignore_eos=True,
                approx=approx, **extra)


def state(srv: ServerProcess, probe: bool = True) -> dict[str, Any]:
    r = httpx.get(f"{srv.base_url}/specapprox/state", params={"probe": int(probe)}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def is_idle(st: dict[str, Any]) -> bool:
    return (all(e["kv_blocks_used"] == 0 for e in st["engines"].values())
            and st["compacted_kv"]["entries"] == 0 and st["draft_captures"] == 0
            and st["admission"]["active"] == 0 and st["admission"]["queued"] == 0)


def seconds_until_idle(srv: ServerProcess, since: float, limit: float = 30.0) -> float:
    """Time from ``since`` until a probed state is idle (the probe's own time included)."""
    while time.monotonic() - since < limit:
        st = state(srv)
        if is_idle(st):
            return time.monotonic() - since
        time.sleep(0.05)
    raise AssertionError(f"not idle {limit} s after the request ended: {st}")


def probe_seconds(srv: ServerProcess) -> float:
    t0 = time.monotonic()
    assert is_idle(state(srv))
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def rsrv():
    """A two-engine server (the draft on an engine of its own, as with a draft model other
    than the target), so that the draft stage's faults can be tested; the one-model default
    server's own tests use ``server``."""
    require_model()
    srv = ServerProcess("--server.max_active_requests", "2", "--server.max_queued_requests",
                        "2", "--server.request_timeout_s", str(TIMEOUT_S),
                        "--draft.share_target_engine", "false").start()
    yield srv
    srv.stop()


def test_state_route_reports_both_engines_idle(rsrv: ServerProcess) -> None:
    st = state(rsrv)
    assert set(st["engines"]) == {"target", "draft"}
    for e in st["engines"].values():
        assert e["alive"] and e["pids"] and e["kv_blocks_total"] > 0
    assert st["healthy"] and is_idle(st)
    assert st["admission"]["max_active"] == 2 and st["admission"]["max_queued"] == 2
    assert st["process"]["rss_bytes"] > 0 and st["process"]["num_processes"] >= 3


def test_server_trims_worker_heaps_once_idle(rsrv: ServerProcess) -> None:
    """After serving, the idle server asks every engine worker to return freed heap memory
    (``server/memory_trim.py``); the trim reaches the workers (their reply times add up)."""
    before = state(rsrv, probe=False)["memory_trim"]
    assert before["interval_s"] == 30.0
    r = httpx.post(f"{rsrv.base_url}/v1/chat/completions", json=long_chat("speckv", 8),
                   timeout=120)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    while (now := state(rsrv, probe=False)["memory_trim"])["runs"] == before["runs"]:
        assert time.monotonic() < deadline, f"no trim within 10 s of going idle: {now}"
        time.sleep(0.2)
    assert now["released_bytes_total"] >= before["released_bytes_total"]
    assert now["ms_last"] > 0  # the slowest process's malloc_trim took measurable time


def test_burst_far_above_the_limit_is_throttled_not_buffered(rsrv: ServerProcess) -> None:
    """Four long streams fill both slots and both queue places; a burst of twenty sent
    while they hold them must all be turned away at once with 429 and ``Retry-After``.

    The holders are confirmed in place through ``/specapprox/state`` before the burst
    goes out: a burst that merely races short requests was seen, under CI load, to
    trickle in as slots freed, so that it never met a full server."""
    # The previous test's request may still hold its slot after its client has the answer
    # (seen once in CI: one holder was then turned away); start from an idle server.
    seconds_until_idle(rsrv, time.monotonic())
    before = state(rsrv, probe=False)["admission"]["rejected"]
    peak = {"queued": 0, "active": 0}

    async def hold(c: httpx.AsyncClient, i: int) -> None:
        body = long_chat("none", stream=True)
        async with c.stream("POST", f"{rsrv.base_url}/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_lines():
                pass

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as c:
            holders = [asyncio.ensure_future(hold(c, i)) for i in range(4)]
            try:
                deadline = time.monotonic() + 10
                while True:  # both slots taken and both queue places
                    adm = (await c.get(f"{rsrv.base_url}/specapprox/state")).json()["admission"]
                    if adm["active"] == 2 and adm["queued"] == 2:
                        break
                    assert time.monotonic() < deadline, f"holders not in place: {adm}"
                    await asyncio.sleep(0.05)
                burst = await asyncio.gather(*[
                    c.post(f"{rsrv.base_url}/v1/chat/completions", json=chat(f"Hi {i}."))
                    for i in range(20)])
                adm = (await c.get(f"{rsrv.base_url}/specapprox/state")).json()["admission"]
                peak.update(active=adm["active"], queued=adm["queued"])
                return burst
            finally:
                for h in holders:  # the clients go away: their requests are aborted
                    h.cancel()
                await asyncio.gather(*holders, return_exceptions=True)

    rs = asyncio.run(scenario())
    codes = [r.status_code for r in rs]
    assert codes == [429] * 20, (codes, rsrv.tail())
    for r in rs:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "RateLimitError"
    assert peak == {"active": 2, "queued": 2}  # nothing more was taken in
    assert state(rsrv, probe=False)["admission"]["rejected"] - before == 20
    seconds_until_idle(rsrv, time.monotonic())  # the dropped holders released everything
    ok = httpx.post(f"{rsrv.base_url}/v1/chat/completions", json=chat("Hi"), timeout=120)
    assert ok.status_code == 200


def test_request_over_its_deadline_is_aborted_with_504(rsrv: ServerProcess) -> None:
    t0 = time.monotonic()
    r = httpx.post(f"{rsrv.base_url}/v1/chat/completions", json=long_chat("speckv"),
                   timeout=120)
    took = time.monotonic() - t0
    assert r.status_code == 504, r.text
    assert r.json()["error"]["type"] == "TimeoutError"
    assert TIMEOUT_S - 1 <= took <= TIMEOUT_S + 15
    seconds_until_idle(rsrv, time.monotonic())  # KV and stored compacted KV released


def test_stream_over_its_deadline_ends_with_one_error_event(rsrv: ServerProcess) -> None:
    events = []
    with httpx.stream("POST", f"{rsrv.base_url}/v1/chat/completions",
                      json=long_chat("none", stream=True), timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    err = json.loads(events[-2])["error"]
    assert err["code"] == 504 and err["type"] == "TimeoutError"
    assert len(events) > 3  # tokens were streamed before the deadline
    seconds_until_idle(rsrv, time.monotonic())


@pytest.mark.parametrize("method", ["none", "specpc", "speckv"])
def test_disconnect_mid_stream_releases_everything_within_a_second(
        rsrv: ServerProcess, method: str) -> None:
    probe = probe_seconds(rsrv)
    chunks = 0
    with httpx.stream("POST", f"{rsrv.base_url}/v1/chat/completions",
                      json=long_chat(method, stream=True), timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                chunks += 1
                if chunks == 3:
                    break
    t_close = time.monotonic()  # leaving the block closed the connection
    assert chunks == 3
    released = seconds_until_idle(rsrv, t_close)
    assert released - probe < 1.0, (released, probe)


@pytest.mark.parametrize("method", ["specpc", "speckv"])
def test_client_gone_during_the_draft_stage_aborts_the_draft(
        rsrv: ServerProcess, method: str) -> None:
    probe = probe_seconds(rsrv)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{rsrv.base_url}/v1/chat/completions", json=long_chat(method),
                   timeout=httpx.Timeout(120, read=0.5))
    t_close = time.monotonic()
    released = seconds_until_idle(rsrv, t_close)
    assert released - probe < 1.0, (released, probe)


def test_one_model_server_has_one_engine(server: ServerProcess) -> None:
    """The default server drafts with the target itself: one engine, one KV pool."""
    st = state(server)
    assert set(st["engines"]) == {"target"} and is_idle(st)


def test_disconnect_during_the_lookahead_releases_everything(server: ServerProcess) -> None:
    """Self-draft: the first tokens of a SpecKV answer come from the lookahead phase (64
    tokens here); a client leaving then leaves no stored KV, capture or block behind."""
    probe = probe_seconds(server)
    body = long_chat("speckv", stream=True, stream_options={"include_usage": True})
    body["approx"]["lookahead"] = 64
    chunks = 0
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body,
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                chunks += 1
                if chunks == 3:
                    break
    t_close = time.monotonic()
    assert chunks == 3
    released = seconds_until_idle(server, t_close)
    assert released - probe < 1.0, (released, probe)


def test_cors_is_off_by_default(server: ServerProcess) -> None:
    pre = httpx.options(f"{server.base_url}/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    get = httpx.get(f"{server.base_url}/v1/models", headers={"Origin": "https://evil.example"})
    assert get.status_code == 200 and "access-control-allow-origin" not in get.headers


def test_request_ids_are_logged_and_prompts_are_not(server: ServerProcess) -> None:
    marker = "zebra-quartz-marmalade-4417"
    r = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=120,
                   headers={"X-Request-Id": "rid-issue8-check"},
                   json=chat(f"Repeat this word: {marker}", max_tokens=4))
    assert r.status_code == 200 and r.headers["x-request-id"] == "rid-issue8-check"
    assert r.json()["id"].endswith("rid-issue8-check")  # vLLM named its request after it
    time.sleep(0.5)
    log = server.log_path.read_text()
    assert "rid-issue8-check" in log
    assert marker not in log


def test_engine_death_makes_health_503_and_requests_fail_fast(rsrv: ServerProcess) -> None:
    """Runs last in the module: it kills the draft's engine process."""
    pid = state(rsrv, probe=False)["engines"]["draft"]["pids"][0]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while httpx.get(f"{rsrv.base_url}/health", timeout=10).status_code != 503:
        assert time.monotonic() < deadline, "health still 200 after the draft died"
        time.sleep(0.25)
    for body in (chat("Hi"), long_chat("specpc", max_tokens=8)):
        t0 = time.monotonic()
        r = httpx.post(f"{rsrv.base_url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 503 and time.monotonic() - t0 < 3.0
        assert r.json()["error"]["type"] == "ServiceUnavailableError"
    st = state(rsrv, probe=False)
    assert not st["healthy"] and not st["engines"]["draft"]["alive"]
    assert rsrv.proc is not None and rsrv.proc.poll() is None  # still up, answering 503


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Processes not yet gone; a zombie counts as gone (it holds nothing, and PID 1 of a
    container may never reap a reparented one)."""
    out = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigterm_drains_in_flight_requests_and_leaves_no_engine_behind() -> None:
    require_model()
    srv = ServerProcess("--server.shutdown_timeout_s", "60").start()
    try:
        assert srv.proc is not None
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        assert len(children) >= 2  # two engine-core processes at least
        result: dict[str, Any] = {}
        first_chunk = threading.Event()

        def stream() -> None:
            events = []
            with httpx.stream("POST", f"{srv.base_url}/v1/chat/completions", timeout=300,
                              json=chat("Count to one hundred.", max_tokens=48,
                                        ignore_eos=True, stream=True)) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first_chunk.set()
            result["events"] = events

        t = threading.Thread(target=stream)
        t.start()
        assert first_chunk.wait(120)
        srv.proc.send_signal(signal.SIGTERM)  # the server only, as an orchestrator would
        t.join(180)
        events = result["events"]
        assert events[-1] == "[DONE]"
        finals = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]
                  if json.loads(e).get("choices")]
        assert finals[-1] == "length"  # the in-flight request finished, not cut off
        assert srv.proc.wait(120) == 0
        deadline = time.monotonic() + 120  # a worker freeing GBs can take a while here
        while running(children) and time.monotonic() < deadline:
            time.sleep(1)
        assert not running(children), [p.pid for p in running(children)]
    finally:
        srv.stop()


def engine_core_started(procs: list[psutil.Process]) -> bool:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in " ".join(p.cmdline()):
                return True
    return False


def test_sigterm_while_the_engines_start_leaves_nothing_behind() -> None:
    """An orchestrator may stop a server that is still loading its engines."""
    require_model()
    srv = ServerProcess()
    proc = srv.spawn()
    try:
        deadline = time.monotonic() + 600
        children: list[psutil.Process] = []
        while not engine_core_started(children):
            assert proc.poll() is None and time.monotonic() < deadline, srv.tail()
            time.sleep(0.5)
            with contextlib.suppress(psutil.Error):
                children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) != 0  # interrupted, not served
        deadline = time.monotonic() + 120
        while running(children) and time.monotonic() < deadline:
            time.sleep(1)
        assert not running(children), [p.pid for p in running(children)]
    finally:
        srv.stop()

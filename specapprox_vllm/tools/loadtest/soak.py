"""Soak test (issue 8, part 6): a long mixed workload, then proof that the server let go of
everything it took.

Why: the other tests show that each path works once. They do not show that a server which has
served, streamed, been abandoned mid-stream and been sent garbage for twenty minutes is back
where it started. Leaks here have concrete places to hide: compacted KV parked for a decode
request that never came (a cancelled SpecKV stream), draft captures of an aborted SpecPC
request, KV blocks of either engine, admission slots, and process memory. Each one only shows
after many requests, so one long run checks them all.

What: ``--concurrency`` closed-loop workers for ``--duration`` seconds. Each request draws
(seeded by ``--seed`` and its number) a kind, one of the registered methods (all of them by
default, ``--methods``) with small budgets or ``invalid``, a filler prompt of ~300-1500 tokens
with a question, max_tokens 8-32, and a mode: plain (openai SDK), streamed (raw SSE via httpx,
so that ``[DONE]`` is seen), or streamed and abandoned after 1-3 chunks (stream closed, or its
task cancelled). Invalid requests (``approx.method`` "bogus", ``max_tokens`` -1, ``kv_budget``
0, malformed JSON) must get a 400. Every request gets exactly one terminal outcome: ok,
cancelled, rejected (the expected 400), throttled (429 with Retry-After, which the worker then
honours) or unexpected (5xx, connection error, timeout, a broken stream, anything else). At the
end the soak waits up to ``--quiesce-s`` for the server to go idle and reads
``GET /specapprox/state``.

Invariants (all must hold, exit status 0): one terminal outcome per request, no unexpected
outcome, no lost request, engines alive, both engines' ``kv_blocks_used`` back to the idle
baseline read at the start, ``compacted_kv.entries == 0``, ``draft_captures == 0``, admission
idle, and RSS growth from the end of the warm-up (10 % of the run, at least 30 s and one
request of each kind) to the end at most ``--max-rss-growth-mb``, read as the growth of the
RSS floor (least sample in a window of two heap-trim intervals, at least 60 s, at each end;
``rss_floors`` says why). Exit status 1: an invariant
failed; 2: bad arguments, or the server has no ``/specapprox/state``; 3: server unreachable.
The bookkeeping and the invariants are in :mod:`specapprox_vllm.tools.loadtest.soak_checks`
(pure, unit-tested); this module sends the requests and reads the state.

    specapprox-soak                                         # own server, 20 min
    python -m specapprox_vllm.tools.loadtest.soak           # the same
    python scripts/soak.py                                  # the same, from a checkout
    python scripts/soak.py --base-url http://127.0.0.1:8000 --duration 120 --concurrency 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from specapprox_vllm.policies import DEFAULT_METHOD, SpecKVPolicy, get_policy, method_names
from specapprox_vllm.tools.eval.specpc_common import REPO, Server, machine_info
from specapprox_vllm.tools.loadtest.cli import UsageError, first_model, root_url
from specapprox_vllm.tools.loadtest.prompts import WORDS
from specapprox_vllm.tools.loadtest.soak_checks import (
    MIB,
    OUTCOMES,
    Ledger,
    Record,
    Result,
    check_invariants,
    check_response,
    check_stream,
    classify_error,
    format_table,
    rate_series,
    rss_floors,
    state_checks,
    state_value,
)

#: The kinds drawn by default: every registered method.
METHODS = method_names()
INVALID = "invalid"
INVALID_CASES = ("bogus_method", "negative_max_tokens", "zero_kv_budget", "malformed_json")
STATE_PATH = "/specapprox/state"


class StateMissing(RuntimeError):
    """The server answers 404 to ``GET /specapprox/state``."""


@dataclass
class Spec:
    kind: str
    mode: str
    body: dict[str, Any]
    cancel_after: int = 0
    cancel_style: str = "close"


def draw(rid: int, args: argparse.Namespace, model: str) -> Spec:
    """Request ``rid``'s kind, mode and body; depends only on ``(--seed, rid)``. The first
    draws cover every kind once (so that the warm-up can end) and plain, stream and cancel."""
    rng = random.Random(args.seed * 1_000_003 + rid)
    kinds = [*args.methods, INVALID]
    kind = kinds[rid] if rid < len(kinds) else (
        INVALID if rng.random() < args.invalid_share else rng.choice(args.methods))
    n_words = rng.randint(300, 1500) if kind != INVALID else 40
    words = [rng.choice(WORDS) for _ in range(n_words)]
    secret = rng.randint(1000, 9999)
    words.insert(rng.randrange(len(words)), f". The secret number is {secret}.")
    text = (f"[soak {args.seed}-{rid}] " + " ".join(words)
            + "\n\nWhat is the secret number in the text above? Answer with the number only.")
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}],
                            "max_tokens": rng.randint(8, 32), "temperature": 0.0}
    approx: dict[str, Any] = {"method": kind}
    if kind != INVALID:  # which budgets a method takes is a fact of its policy
        policy = get_policy(kind)
        if policy.compresses_prompt:
            approx["prompt_budget"] = args.prompt_budget
        if policy.compresses_kv:
            approx["kv_budget"] = args.kv_budget
    if kind == INVALID:
        mode = rng.choice(INVALID_CASES)
        approx = {"bogus_method": {"method": "bogus"}, "zero_kv_budget": {
            "method": SpecKVPolicy.name, "kv_budget": 0}}.get(mode, {"method": DEFAULT_METHOD})
        if mode == "negative_max_tokens":
            body["max_tokens"] = -1
    elif rid < len(kinds) and args.stream_share > 0:  # short runs see every mode too
        mode = ("plain", "stream", "cancel" if args.cancel_share > 0 else "stream")[rid % 3]
    elif rng.random() < args.stream_share:
        mode = "cancel" if rng.random() < args.cancel_share else "stream"
    else:
        mode = "plain"
    body["approx"] = approx
    if mode in ("stream", "cancel"):
        body.update(stream=True, stream_options={"include_usage": True})
    return Spec(kind, mode, body, rng.randint(1, 3), rng.choice(("close", "task")))


class Soak:
    """One run: the workers, the monitor and the ledger."""

    def __init__(self, args: argparse.Namespace, root: str, http: httpx.AsyncClient,
                 oai: openai.AsyncOpenAI, model: str, headers: dict[str, str]) -> None:
        self.args, self.root, self.http, self.oai = args, root, http, oai
        self.model, self.headers, self.ledger = model, headers, Ledger()
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.duration
        self.warm_s = args.warmup_s if args.warmup_s is not None else max(
            0.1 * args.duration, 30.0)
        self.warm: dict[str, Any] | None = None
        self.rss: list[list[float]] = []
        # [t, live heap bytes, free heap bytes] over all processes, after the server's last
        # heap trim (its malloc statistics): tells a pile-up of live memory from fragmentation
        self.heap: list[list[float]] = []
        self.state_errors: list[str] = []
        self.next_rid = 0
        self.stop = asyncio.Event()

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def worker(self) -> None:
        while time.monotonic() < self.deadline:
            rid, self.next_rid = self.next_rid, self.next_rid + 1
            spec = draw(rid, self.args, self.model)
            rec = Record(rid, spec.kind, spec.mode, round(self.now(), 3))
            self.ledger.send(rec)
            try:
                res = await self.one(spec)
            except Exception as e:  # noqa: BLE001 - timeouts, resets: data, never a crash
                res = Result("unexpected", None, f"{type(e).__name__}: {e}"[:300])
            self.ledger.finish(rid, res, self.now() - rec.start)
            if res.outcome == "unexpected":
                print(f"  UNEXPECTED #{rid} {spec.kind}/{spec.mode}: {res.detail}",
                      file=sys.stderr, flush=True)
            if res.retry_after:  # honour Retry-After, but not past the end of the run
                left = max(0.0, self.deadline - time.monotonic())
                await asyncio.sleep(min(res.retry_after, left))

    async def one(self, spec: Spec) -> Result:
        url, invalid = self.root + "/v1/chat/completions", spec.kind == INVALID
        if spec.mode == "malformed_json":
            r = await self.http.post(url, content=json.dumps(spec.body)[:-7].encode(),
                                     headers={**self.headers, "content-type": "application/json"})
            return classify_error(r.status_code, r.headers, r.text, True)
        if spec.mode in ("stream", "cancel"):
            if spec.mode == "cancel" and spec.cancel_style == "task":
                return await self.cancel_task(url, spec)
            return await self.stream(url, spec, None)
        body = dict(spec.body)
        try:
            resp = await self.oai.chat.completions.create(
                model=body.pop("model"), messages=body.pop("messages"),
                max_tokens=body.pop("max_tokens"), temperature=body.pop("temperature"),
                extra_body=body)
        except openai.APIStatusError as e:
            return classify_error(e.status_code, e.response.headers, e.response.text, invalid)
        if invalid:
            return Result("unexpected", 200, f"invalid request ({spec.mode}) was accepted")
        problem = check_response(resp.model_dump(), spec.kind)
        return Result("unexpected", 200, problem) if problem else Result("ok", 200)

    async def stream(self, url: str, spec: Spec, reached: asyncio.Event | None) -> Result:
        """A streamed request, read to its end; closed after ``cancel_after`` chunks in mode
        cancel (or, with ``reached``, signalled to the caller, which cancels this task)."""
        payloads: list[str] = []
        async with self.http.stream("POST", url, json=spec.body, headers=self.headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                return classify_error(resp.status_code, resp.headers, text, False)
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payloads.append(line[5:].strip())
                if spec.mode == "cancel" and len(payloads) == spec.cancel_after \
                        and payloads[-1] != "[DONE]":
                    if reached is None:
                        return Result("cancelled", 200, f"closed after {len(payloads)} chunks")
                    reached.set()
        problem = check_stream(payloads)
        return Result("unexpected", 200, problem) if problem else Result("ok", 200)

    async def cancel_task(self, url: str, spec: Spec) -> Result:
        reached = asyncio.Event()
        task = asyncio.create_task(self.stream(url, spec, reached))
        waiter = asyncio.create_task(reached.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():  # finished (or failed) before the cancel point
            return task.result()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return Result("cancelled", 200, f"task cancelled after {spec.cancel_after} chunks")
        return task.result()

    async def state(self, probe: bool = False) -> dict[str, Any]:
        return await get_state(self.http, self.root, self.headers, probe)

    async def monitor(self) -> None:
        """Every ``--sample-s``: RSS into the series, warm-up end, a progress line."""
        kinds = {*self.args.methods, INVALID}
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), self.args.sample_s)
            except asyncio.TimeoutError:
                pass
            t, rss = self.now(), None
            try:
                st = await self.state()
                rss = st["process"]["rss_bytes"]
                self.rss.append([round(t, 1), rss])
                if heap := state_value(st, "memory_trim", "heap"):
                    self.heap.append([round(t, 1),
                                      sum(h["in_use_bytes"] for h in heap.values()),
                                      sum(h["free_bytes"] for h in heap.values())])
            except Exception as e:  # noqa: BLE001 - recorded; the end state decides
                self.state_errors.append(f"{t:.0f} s: {type(e).__name__}: {e}"[:300])
            done = {r.kind for r in self.ledger.sent.values() if r.outcome}
            if self.warm is None and rss is not None and t >= self.warm_s and done >= kinds:
                self.warm = {"t": round(t, 1), "rss_bytes": rss}
                print(f"  warm-up over at {t:.0f} s, RSS {rss / MIB:.0f} MiB", flush=True)
            c = self.ledger.counts()
            flight = c["sent"] - sum(c[o] for o in OUTCOMES)
            print(f"[{t:5.0f} s] sent {c['sent']} | " + " ".join(f"{o} {c[o]}" for o in OUTCOMES)
                  + f" | in flight {flight} | RSS " + (f"{rss / MIB:.0f} MiB" if rss else "?"),
                  flush=True)


async def get_state(http: httpx.AsyncClient, root: str, headers: dict[str, str],
                    probe: bool = False) -> dict[str, Any]:
    """The server's state. ``probe``: the server first runs a one-token request per engine,
    because vLLM updates an engine's KV-block gauge only after a step (an aborted request
    leaves the last busy value); exact, but not free, so only for the baseline and the end."""
    r = await http.get(root + STATE_PATH, params={"probe": 1} if probe else None,
                       headers=headers, timeout=60)
    if r.status_code == 404:
        raise StateMissing(f"server has no {STATE_PATH} (GET {root}{STATE_PATH} -> 404)")
    r.raise_for_status()
    return dict(r.json())


async def quiesce(soak: Soak, before: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Poll the state until it is idle (or ``--quiesce-s`` passed); the last state read."""
    t0 = time.monotonic()
    while True:
        st = await soak.state(probe=True)
        busy = any(state_value(e, "requests_running") or state_value(e, "requests_waiting")
                   for e in (st.get("engines") or {}).values())
        if (not busy and all(v["ok"] for v in state_checks(before, st).values())) or \
                time.monotonic() - t0 >= soak.args.quiesce_s:
            return st, round(time.monotonic() - t0, 1)
        await asyncio.sleep(1.0)


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    if report["rss_series"]:
        ts, rss = zip(*report["rss_series"], strict=True)
        ax1.plot(ts, [r / MIB for r in rss], marker=".", label="RSS")
    if report.get("heap_series"):
        ts, live, _ = zip(*report["heap_series"], strict=True)
        ax1.plot(ts, [b / MIB for b in live], label="malloc live bytes (after last trim)")
    if report["warm"]:
        ax1.axvline(report["warm"]["t"], color="grey", ls="--", label="warm-up end")
    ax1.legend()
    ax1.set_ylabel("server memory (MiB)")
    if report["rate_series"]:
        ts, rate = zip(*report["rate_series"], strict=True)
        bin_s = report["config"]["sample_s"]
        ax2.step([*ts, ts[-1] + bin_s], [*rate, rate[-1]], where="post")
    ax2.set_ylabel("requests/s")
    ax2.set_xlabel("seconds since start")
    fig.suptitle(f"soak: {report['config']['duration']} s, concurrency "
                 f"{report['config']['concurrency']}, {'PASS' if report['passed'] else 'FAIL'}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def run_soak(args: argparse.Namespace, root: str) -> dict[str, Any]:
    """The whole soak against ``root``; returns the report (also written to ``--out``)."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout, connect=10.0),
                                 trust_env=False, follow_redirects=False) as http:
        before = await get_state(http, root, headers, probe=True)  # a missing route: at once
        model = args.model or await first_model(http, root, headers)
        oai = openai.AsyncOpenAI(base_url=root + "/v1", api_key=args.api_key or "unused",
                                 max_retries=0, timeout=args.request_timeout,
                                 http_client=openai.DefaultAsyncHttpxClient(trust_env=False))
        soak = Soak(args, root, http, oai, model, headers)
        if isinstance(rss0 := state_value(before, "process", "rss_bytes"), int):
            soak.rss.append([0.0, rss0])
        monitor = asyncio.create_task(soak.monitor())
        await asyncio.gather(*(soak.worker() for _ in range(args.concurrency)))
        soak.stop.set()
        await monitor
        ran_s = soak.now()
        try:
            after, quiesce_s = await quiesce(soak, before)
        except Exception as e:  # noqa: BLE001 - a dead server still gets its report
            after, quiesce_s = {"error": f"{type(e).__name__}: {e}"}, None
        await oai.close()
    if isinstance(end := state_value(after, "process", "rss_bytes"), int):
        soak.rss.append([round(soak.now(), 1), end])
    trim_s = state_value(after, "memory_trim", "interval_s") or 0.0
    window_s = max(60.0, 2 * trim_s)
    warm_floor, end_floor = rss_floors(soak.rss, soak.warm["t"] if soak.warm else None, window_s)
    inv = check_invariants(soak.ledger, before, after, warm_floor, args.max_rss_growth_mb,
                           end_rss=end_floor)
    cfg = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return {"config": {**cfg, "base_url": root, "model": model}, "machine": machine_info(),
            "ran_s": round(ran_s, 1), "quiesce_s": quiesce_s, "counts": soak.ledger.counts(),
            "by_kind": soak.ledger.by_kind(), "warm": soak.warm, "rss_series": soak.rss,
            "heap_series": soak.heap,
            "rss_floors": {"window_s": window_s, "warm": warm_floor, "end": end_floor},
            "rate_series": rate_series(soak.ledger, args.sample_s),
            "state_before": before, "state_after": after, "state_errors": soak.state_errors,
            "invariants": inv, "passed": all(v["ok"] for v in inv.values()),
            "unexpected": [asdict(r) for r in soak.ledger.sent.values()
                           if r.outcome in ("unexpected", None)][:50],
            "requests": [asdict(r) for r in soak.ledger.sent.values()]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=None,
                   help="server to soak (default: start one with default args, stop it after)")
    p.add_argument("--duration", type=float, default=1200.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m],
                   default=list(METHODS), help="comma-separated approx methods to draw from "
                                               "(default: every registered method)")
    p.add_argument("--kv-budget", type=int, default=64)
    p.add_argument("--prompt-budget", type=int, default=256)
    p.add_argument("--stream-share", type=float, default=0.5, help="share streamed")
    p.add_argument("--cancel-share", type=float, default=0.3,
                   help="share of streamed requests abandoned after 1-3 chunks")
    p.add_argument("--invalid-share", type=float, default=0.1,
                   help="share of deliberately invalid requests (must get a 400)")
    p.add_argument("--max-rss-growth-mb", type=float, default=256.0)
    p.add_argument("--warmup-s", type=float, default=None,
                   help="RSS baseline after this (default: 10%% of --duration, >= 30 s)")
    p.add_argument("--sample-s", type=float, default=10.0, help="RSS sample/progress period")
    p.add_argument("--quiesce-s", type=float, default=30.0, help="max wait for an idle server")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--model", default=None, help="default: first of /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback host")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "soak.json",
                   help="report JSON; the PNG goes beside it")
    return p


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    write_plot(out.with_suffix(".png"), report)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        bad = [m for m in args.methods if m not in method_names()]
        if bad or not args.methods or args.duration <= 0 or args.concurrency < 1 or not all(
                0 <= s <= 1 for s in (args.stream_share, args.cancel_share, args.invalid_share)):
            raise UsageError(f"bad arguments (unknown methods {bad}, or a duration, "
                             "concurrency or share out of range)")
        srv = Server(base_url=root_url(args.base_url, args.allow_remote) if args.base_url else None)
        srv.start()  # external: checks /health; own: starts it with default args
    except UsageError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    except (httpx.HTTPError, RuntimeError, TimeoutError) as e:
        print(f"soak: cannot reach or start the server: {e!r}", file=sys.stderr)
        return 3
    report: dict[str, Any] | None = None
    try:
        report = asyncio.run(run_soak(args, srv.base_url))
        write_report(args.out, report)  # before stopping the server: a stop problem must
        # not cost the run's figures
    except StateMissing as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    except httpx.HTTPError as e:
        print(f"soak: server unreachable: {e!r}", file=sys.stderr)
        return 3
    finally:
        try:
            srv.stop()  # a no-op for an external server
        except RuntimeError as e:  # processes still exiting after SIGKILL
            print(f"soak: warning: {e}", file=sys.stderr)
            if report is not None:
                report["server_stop_warning"] = str(e)
                write_report(args.out, report)
    assert report is not None
    print(format_table(report["by_kind"]))
    for name, v in report["invariants"].items():
        print(f"  {'PASS' if v['ok'] else 'FAIL'}  {name}: {v['detail']}")
    print(f"{'PASSED' if report['passed'] else 'FAILED'}; wrote {args.out} and "
          f"{args.out.with_suffix('.png')}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

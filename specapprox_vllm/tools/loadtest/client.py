"""Sending the requests of one load-test setting: request bodies, SSE parsing, Poisson
arrivals and a concurrency cap.

The client is plain ``httpx`` (no OpenAI SDK) so that every byte of timing is ours and any
OpenAI-compatible server works. ``trust_env=False`` on the client (see ``cli.py``) keeps
proxy variables from routing load-test traffic anywhere but the given base URL.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from specapprox_vllm.tools.loadtest.prompts import Prompt
from specapprox_vllm.tools.loadtest.stats import RequestRecord

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass
class RunConfig:
    """What every request of a run shares."""

    root_url: str
    backend: str
    model: str
    stream: bool = True
    temperature: float = 0.0
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    max_concurrency: int | None = None
    request_rate: float = float("inf")
    seed: int = 0
    keep_text: bool = False

    @property
    def url(self) -> str:
        return self.root_url.rstrip("/") + ENDPOINTS[self.backend]


def build_body(prompt: Prompt, cfg: RunConfig, approx: dict[str, Any] | None) -> dict[str, Any]:
    """One request body; ``approx`` (when given) is sent as the request's ``approx`` object."""
    body: dict[str, Any] = {"model": cfg.model, "max_tokens": prompt.output_len,
                            "temperature": cfg.temperature, "stream": cfg.stream}
    if cfg.backend == "chat":
        body["messages"] = prompt.as_messages()
    else:
        if prompt.text is None:
            raise ValueError("the completions backend needs 'prompt' strings, not 'messages'")
        body["prompt"] = prompt.text
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    if approx is not None:
        body["approx"] = approx
    return body


def _error_of(payload: Any) -> tuple[str | None, str]:
    """(type, message) of an OpenAI-shaped error body, or of whatever came instead."""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        err = payload["error"]
        return (str(err.get("type")) if err.get("type") else None, str(err.get("message", "")))
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return None, payload["error"]
    return None, str(payload)[:500]


def _chunk_text(obj: dict[str, Any]) -> str:
    """The generated text a streamed chunk carries (chat delta, reasoning, or completion)."""
    parts = []
    for choice in obj.get("choices") or []:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key in ("content", "reasoning_content", "reasoning"):
                if isinstance(delta.get(key), str):
                    parts.append(delta[key])
        elif isinstance(choice.get("text"), str):
            parts.append(choice["text"])
    return "".join(parts)


def _take_usage(rec: RequestRecord, usage: Any) -> None:
    if isinstance(usage, dict):
        rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
        rec.completion_tokens = usage.get("completion_tokens", rec.completion_tokens)
        if isinstance(usage.get("approx"), dict):
            rec.approx = usage["approx"]


async def _read_stream(resp: httpx.Response, rec: RequestRecord, t0: float) -> None:
    """Consume an SSE response into ``rec`` (timings, text, usage, in-stream errors)."""
    done, last = False, None
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, ``: ping`` comments, ``event:`` lines
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        now = time.perf_counter() - t0
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            rec.error_type, rec.error = "BadStreamChunk", data[:300]
            return
        if "error" in obj:
            rec.error_type, rec.error = _error_of(obj)
            rec.error_type = rec.error_type or "StreamError"
            return
        text = _chunk_text(obj)
        if text:
            if rec.ttft is None:
                rec.ttft = now
            elif last is not None:
                rec.itl.append(now - last)
            last = now
            rec.text += text
        _take_usage(rec, obj.get("usage"))
    rec.last_token = last
    if not done:
        rec.error_type, rec.error = "StreamIncomplete", "stream ended without [DONE]"
        return
    rec.success = True


async def send_one(client: httpx.AsyncClient, cfg: RunConfig, body: dict[str, Any],
                   rec: RequestRecord, run_t0: float) -> RequestRecord:
    """Send one request and fill ``rec``; never raises (failures are data)."""
    t0 = time.perf_counter()
    rec.start = t0 - run_t0
    try:
        async with client.stream("POST", cfg.url, json=body, headers=cfg.headers) as resp:
            rec.status = resp.status_code
            ctype = resp.headers.get("content-type", "")
            if resp.status_code != 200:
                raw = await resp.aread()
                try:
                    payload: Any = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    payload = raw.decode("utf-8", "replace")
                etype, rec.error = _error_of(payload)
                rec.error_type = etype or f"HTTP {resp.status_code}"
            elif cfg.stream and ctype.startswith("text/event-stream"):
                await _read_stream(resp, rec, t0)
            else:
                obj = json.loads(await resp.aread())
                _take_usage(rec, obj.get("usage"))
                rec.text = "".join((c.get("message") or {}).get("content") or c.get("text") or ""
                                   for c in obj.get("choices") or [])
                rec.success = True
    except Exception as e:  # noqa: BLE001 - every failure is reported, none may stop the run
        rec.error_type, rec.error = type(e).__name__, str(e)[:500] or repr(e)
    rec.e2e = time.perf_counter() - t0
    if not cfg.keep_text:
        rec.text = rec.text[:200]
    return rec


async def run_setting(client: httpx.AsyncClient, cfg: RunConfig, prompts: list[Prompt],
                      label: str, approx: dict[str, Any] | None,
                      progress: Any | None = None) -> tuple[list[RequestRecord], float]:
    """All prompts against one setting: Poisson arrivals at ``request_rate`` (all at once for
    ``inf``), at most ``max_concurrency`` in flight. Returns the records and the duration
    (first request sent -> last response complete)."""
    rng = random.Random(cfg.seed)
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    run_t0 = time.perf_counter()

    async def one(i: int, prompt: Prompt) -> RequestRecord:
        rec = RequestRecord(index=i, setting=label, expected_output_tokens=prompt.output_len)
        body = build_body(prompt, cfg, approx)
        if sem is None:
            await send_one(client, cfg, body, rec, run_t0)
        else:
            async with sem:
                await send_one(client, cfg, body, rec, run_t0)
        if progress is not None:
            progress.update(1)
        return rec

    tasks = []
    for i, prompt in enumerate(prompts):
        tasks.append(asyncio.create_task(one(i, prompt)))
        if cfg.request_rate != float("inf") and i < len(prompts) - 1:
            await asyncio.sleep(rng.expovariate(cfg.request_rate))
    records = list(await asyncio.gather(*tasks))
    return records, time.perf_counter() - run_t0

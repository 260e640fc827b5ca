"""``specapprox-loadtest``: a load test of any OpenAI-compatible server (ours or stock vLLM).

    specapprox-loadtest --base-url http://127.0.0.1:8000 --num-prompts 32 --input-len 2048 \\
        --output-len 64 --max-concurrency 8 --compare none,specpc,speckv --plot

Traffic goes only to ``--base-url``; hosts other than loopback are refused unless
``--allow-remote`` is given (a load test aimed at the wrong address is an incident), proxy
environment variables are ignored and redirects are not followed.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from specapprox_vllm.tools.loadtest.client import ENDPOINTS, RunConfig, run_setting
from specapprox_vllm.tools.loadtest.prompts import (
    LocalTokenizer,
    Prompt,
    ServerTokenizer,
    Tokenizer,
    load_dataset,
    synthetic_prompts,
    tag_prompt,
)
from specapprox_vllm.tools.loadtest.report import (
    format_block,
    format_comparison,
    write_plots,
    write_results,
)
from specapprox_vllm.tools.loadtest.stats import parse_goodput, summarize


class UsageError(ValueError):
    """A bad command line: reported in one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specapprox-loadtest",
        description="Load-test an OpenAI-compatible server; prints the `vllm bench serve` "
                    "block plus usage.approx statistics, writes JSONL + summary JSON "
                    "(+ PNG charts with --plot).")
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server root URL (a trailing /v1 is accepted)")
    p.add_argument("--backend", choices=sorted(ENDPOINTS), default="chat",
                   help="chat: /v1/chat/completions; completions: /v1/completions")
    p.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    p.add_argument("--api-key", default=None, help="bearer token, if the server wants one")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="cap on requests in flight (default: no cap)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrival rate in requests/s; inf sends all at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-len", type=int, default=1024,
                   help="tokens per synthetic prompt (the user message, for chat)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--dataset", type=Path, default=None,
                   help='JSONL of {"prompt": ...} or {"messages": [...]} (+ "output_len")')
    p.add_argument("--shuffle", action="store_true", help="shuffle the dataset (by --seed)")
    p.add_argument("--tokenizer", default=None,
                   help="local HF tokenizer folder for synthetic prompts "
                        "(default: the server's /tokenize)")
    p.add_argument("--approx", default=None,
                   help='approx object merged into every request, e.g. '
                        '\'{"method": "speckv", "kv_budget": 256}\'')
    p.add_argument("--compare", default=None,
                   help="settings run back to back: method names (none,specpc,speckv) or a "
                        "JSON list of approx objects")
    p.add_argument("--no-stream", action="store_true", help="non-streamed requests (no TTFT)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos (vLLM) so every reply has --output-len tokens")
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, KEY in ttft, tpot, e2el (milliseconds)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-cache-bust", action="store_true",
                   help="do not tag prompts per run/setting (lets prefix caching hit)")
    p.add_argument("--result-dir", type=Path, default=None,
                   help="where to write requests.jsonl, summary.json and charts "
                        "(default: results/loadtest/<UTC time>)")
    p.add_argument("--plot", action="store_true", help="also write PNG charts")
    p.add_argument("--save-text", action="store_true", help="keep full replies in the JSONL")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--fail-on-error", action="store_true",
                   help="exit with status 1 when any request failed")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --base-url host")
    return p


def root_url(base_url: str, allow_remote: bool) -> str:
    """The server root (no ``/v1``), after checking that its host may be targeted."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--base-url must be an http(s) URL, got {base_url!r}")
    host = parts.hostname
    loopback = host == "localhost"
    try:
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not loopback and not allow_remote:
        raise UsageError(f"refusing non-loopback host {host!r}: pass --allow-remote to load "
                         "a server you are allowed to load")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return f"{parts.scheme}://{parts.netloc}{path}"


def _json_arg(value: str, flag: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag}: not JSON ({e.msg})") from None


def _label(approx: dict[str, Any]) -> str:
    rest = ",".join(f"{k}={v}" for k, v in approx.items() if k != "method")
    return f"{approx.get('method')}({rest})" if rest else str(approx.get("method"))


def parse_settings(approx: str | None, compare: str | None) -> list[tuple[str, Any]]:
    """``[(label, approx object or None)]``: one per ``--compare`` item, else the ``--approx``
    object, else ``("default", None)`` (no ``approx`` sent: the server's default method)."""
    if approx is not None and compare is not None:
        raise UsageError("--approx and --compare are exclusive: put full approx objects in "
                         "--compare as a JSON list")
    if compare is None:
        if approx is None:
            return [("default", None)]
        obj = _json_arg(approx, "--approx")
        if not isinstance(obj, dict):
            raise UsageError("--approx must be a JSON object")
        return [(_label(obj), obj)]
    text = compare.strip()
    raw = _json_arg(text, "--compare") if text.startswith("[") else \
        [s.strip() for s in text.split(",") if s.strip()]
    settings: list[tuple[str, Any]] = []
    for item in raw:
        obj = {"method": item} if isinstance(item, str) else item
        if not isinstance(obj, dict) or not isinstance(obj.get("method"), str):
            raise UsageError(f"--compare item {item!r}: needs a method name or an approx "
                             "object with a 'method'")
        label = _label(obj)
        n = sum(1 for lbl, _ in settings if lbl == label or lbl.startswith(label + "#"))
        settings.append((f"{label}#{n + 1}" if n else label, obj))
    if not settings:
        raise UsageError("--compare: no settings")
    return settings


async def first_model(client: httpx.AsyncClient, root: str, headers: dict[str, str]) -> str:
    r = await client.get(f"{root}/v1/models", headers=headers)
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise UsageError(f"{root}/v1/models lists no model: pass --model")
    return str(data[0]["id"])


async def make_prompts(args: argparse.Namespace, tok: Tokenizer | None,
                       run_tag: str | None) -> list[Prompt]:
    if args.dataset is not None:
        base = load_dataset(args.dataset, args.num_prompts, args.output_len, args.seed,
                            args.shuffle)
        return [tag_prompt(p, run_tag, i) for i, p in enumerate(base)]
    assert tok is not None
    return await synthetic_prompts(tok, args.num_prompts, args.input_len, args.output_len,
                                   args.seed, run_tag)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole load test; returns the summary that is also written to summary.json."""
    root = root_url(args.base_url, args.allow_remote)
    settings = parse_settings(args.approx, args.compare)
    slo = parse_goodput(args.goodput)
    extra = _json_arg(args.extra_body, "--extra-body") if args.extra_body else {}
    if not isinstance(extra, dict):
        raise UsageError("--extra-body must be a JSON object")
    if args.num_prompts < 1 or (args.max_concurrency is not None and args.max_concurrency < 1):
        raise UsageError("--num-prompts and --max-concurrency must be >= 1")
    if args.request_rate <= 0:
        raise UsageError("--request-rate must be > 0 (inf: all at once)")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    out_dir = args.result_dir or Path("results") / "loadtest" / datetime.now(
        timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    limits = httpx.Limits(max_connections=args.max_concurrency or args.num_prompts + 4,
                          max_keepalive_connections=args.max_concurrency or args.num_prompts)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout, connect=10.0),
                                 limits=limits, trust_env=False,
                                 follow_redirects=False) as client:
        model = args.model or await first_model(client, root, headers)
        tok: Tokenizer | None = None
        if args.dataset is None:
            tok = LocalTokenizer(args.tokenizer) if args.tokenizer else \
                ServerTokenizer(client, root, model)
        cfg = RunConfig(root_url=root, backend=args.backend, model=model,
                        stream=not args.no_stream, temperature=args.temperature,
                        ignore_eos=args.ignore_eos, extra_body=extra, headers=headers,
                        max_concurrency=args.max_concurrency, request_rate=args.request_rate,
                        seed=args.seed, keep_text=args.save_text)
        run_id = uuid.uuid4().hex[:6]
        all_records, summaries = [], {}
        for n, (label, approx) in enumerate(settings):
            try:
                prompts = await make_prompts(args, tok, None if args.no_cache_bust
                                             else f"{run_id}{n}")
            except httpx.HTTPError as e:
                raise UsageError(f"could not tokenize with the server's /tokenize ({e}); "
                                 "pass --tokenizer PATH") from None
            progress = None
            if not args.disable_tqdm:
                from tqdm import tqdm

                progress = tqdm(total=len(prompts), desc=label, file=sys.stderr)
            records, duration = await run_setting(client, cfg, prompts, label, approx,
                                                  progress)
            if progress is not None:
                progress.close()
            s = summarize(records, duration, slo)
            s["approx_setting"] = approx
            s["input_tokens_fitted"] = [p.input_tokens for p in prompts][:5]
            summaries[label] = s
            all_records += records
            print(format_block(label, s, args.max_concurrency, args.request_rate), flush=True)
    if len(summaries) > 1:
        print(format_comparison(summaries))
    summary = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "argv": sys.argv[1:], "base_url": root, "backend": args.backend,
               "model": model, "num_prompts": args.num_prompts,
               "input_len": None if args.dataset else args.input_len,
               "dataset": str(args.dataset) if args.dataset else None,
               "output_len": args.output_len, "max_concurrency": args.max_concurrency,
               "request_rate": "inf" if args.request_rate == float("inf") else args.request_rate,
               "seed": args.seed, "stream": not args.no_stream, "settings": summaries}
    jsonl, summary_path = write_results(out_dir, all_records, summary, args.save_text)
    written = [jsonl, summary_path]
    if args.plot:
        written += write_plots(out_dir, all_records, summaries)
    print("wrote " + ", ".join(str(p) for p in written))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``sys.exit(main())``): 0 ok, 1 failed requests with
    ``--fail-on-error``, 2 bad arguments, 3 server unreachable."""
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        summary = asyncio.run(run(args))
    except UsageError as e:
        print(f"specapprox-loadtest: {e}", file=sys.stderr)
        return 2
    except httpx.HTTPError as e:
        print(f"specapprox-loadtest: cannot reach {args.base_url}: {e!r}", file=sys.stderr)
        return 3
    failed = sum(s["failed"] for s in summary["settings"].values())
    print(f"done in {time.time() - t0:.1f} s; {failed} failed request(s)")
    return 1 if (failed and args.fail_on_error) else 0



if __name__ == "__main__":
    sys.exit(main())

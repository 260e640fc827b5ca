"""``specapprox-serve``: start the engines and serve the OpenAI-compatible API.

Flags: ``--config FILE`` plus one flag per config key (``--target.max_model_len 4096``), and
the short forms ``--host``, ``--port``, ``--api-key``, ``--default-method``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from server.config import PROJECT_ROOT, ConfigError, _parse_scalar, env_name, leaf_keys, load_config
from server.model_checks import check_draft_tokenizer, check_kv_support
from specapprox_vllm.policies import POLICY_MODULES_ENV

log = logging.getLogger("specapprox.serve")
SHORT_FLAGS = {"host": "server.host", "port": "server.port", "api_key": "server.api_key",
               "default_method": "approx.default_method"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specapprox-serve",
        description="OpenAI-compatible server with draft-based approximate inference (vLLM).",
        epilog="Every key can also be set by environment variable, e.g. "
               f"{env_name('target.max_model_len')}=4096.",
    )
    p.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "default.yaml"),
                   help="YAML config file (default: configs/default.yaml)")
    for short, key in SHORT_FLAGS.items():
        p.add_argument(f"--{short.replace('_', '-')}", dest=f"short__{short}",
                       help=f"same as --{key}")
    for key, field in leaf_keys().items():
        p.add_argument(f"--{key}", dest=key, metavar="VALUE",
                       help=(field.description or "") + f" (env {env_name(key)})")
    return p


def parse_config(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    overrides = {}
    for key in leaf_keys():
        value = getattr(args, key)
        if value is not None:
            overrides[key] = _parse_scalar(value)
    for short, key in SHORT_FLAGS.items():
        value = getattr(args, f"short__{short}")
        if value is not None:
            overrides[key] = value if short == "api_key" else _parse_scalar(value)
    return load_config(args.config, overrides)


async def _watch_engines(server: Any, client: Any, exit_on_death: bool) -> None:
    """Engine death: ``/health`` answers 503 and requests fail fast (``server/guard.py``) as
    soon as vLLM marks an engine errored; with ``exit_on_engine_death`` the server also exits
    (a non-zero status), for orchestrators that restart on exit."""
    while True:
        await asyncio.sleep(1.0)
        if client.errored:
            log.error("an engine process has died: /health now answers 503%s",
                      "; exiting" if exit_on_death else "")
            if exit_on_death:
                server.exit_code = 3
                server.should_exit = True
            return


async def serve(cfg) -> int:
    """Start both engines, serve until SIGTERM/SIGINT (uvicorn drains in-flight requests for
    up to ``shutdown_timeout_s``), then stop the engines, whatever happened."""
    import uvicorn

    from server.app import build_server_app
    from server.engines import draft_engine_args, needs_draft, start_engine, vllm_server_args

    vllm_args = vllm_server_args(cfg)
    from vllm.engine.arg_utils import AsyncEngineArgs

    # The draft starts first: each engine's Prometheus logger resets vLLM's `vllm:*` series
    # when it is created, and those series should describe the target.
    draft = target = watchdog = trim_loop = None
    try:
        draft = start_engine(draft_engine_args(cfg), "draft") if needs_draft(cfg) else None
        target = start_engine(AsyncEngineArgs.from_cli_args(vllm_args), "target")
        await check_kv_support(target)
        built = await build_server_app(cfg, vllm_args, target, draft)
        config = uvicorn.Config(built.asgi, host=cfg.server.host, port=cfg.server.port,
                                log_level=cfg.server.log_level, access_log=False,
                                timeout_graceful_shutdown=cfg.server.shutdown_timeout_s)
        server = uvicorn.Server(config)
        server.exit_code = 0
        built.fastapi.state.server = server  # vLLM's engine-error handler reads it
        watchdog = asyncio.ensure_future(
            _watch_engines(server, built.client, cfg.server.exit_on_engine_death))
        trim_loop = asyncio.ensure_future(built.trimmer.run())
        log.info("serving %s on http://%s:%d", cfg.server.served_model_name,
                 cfg.server.host, cfg.server.port)
        # Start-up is over: uvicorn handles SIGTERM from here (drain, then return), and it
        # re-raises the signal once it has drained; that must not interrupt the shutdown.
        signal.signal(signal.SIGTERM, _after_drain)
        await server.serve()
        log.info("HTTP server stopped; stopping the engines")
        return server.exit_code
    finally:
        for task in (watchdog, trim_loop):
            if task is not None:
                task.cancel()
        for engine in (draft, target):
            if engine is not None:
                with contextlib.suppress(Exception):
                    engine.shutdown()


STARTUP_EXIT_GRACE_S = 30.0


def _after_drain(signum: int, frame: Any) -> None:
    log.info("SIGTERM: already shutting down")


def _hard_exit_after(seconds: float) -> None:
    """Last resort when unwinding stalls: kill our processes and exit."""
    time.sleep(seconds)
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    os._exit(1)


def _terminate_during_startup(signum: int, frame: Any) -> None:
    # Until uvicorn installs its own handlers: unwind through serve()'s `finally`, which
    # stops the engines already started, instead of dying and orphaning them. vLLM's
    # start-up wait was seen to swallow the interrupt (the engine core had died of the same
    # signal, and the client kept waiting for it), so a watchdog thread ends the process
    # after a grace period whatever happens.
    threading.Thread(target=_hard_exit_after, args=(STARTUP_EXIT_GRACE_S,), daemon=True,
                     name="specapprox-startup-exit").start()
    raise KeyboardInterrupt


def engine_environment(exit_on_engine_death: bool) -> dict[str, str]:
    """Environment defaults for the engine processes (they inherit the server's)."""
    return {
        # vLLM's CPU workers reserve one core for the front end by default, which on a 2-core
        # machine pins every engine's worker to core 0. Our engines take turns (draft, then
        # target), so let each use all cores unless the operator says otherwise.
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        # Engine death is handled by our watchdog (exit or stay up answering 503, per
        # config); vLLM's own handler would otherwise stop the server on the first failure.
        "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "0" if exit_on_engine_death else "1",
        # vLLM's CPU linear layers compile a oneDNN matmul primitive per batch token count
        # and keep the last 32 per weight shape themselves; oneDNN's process-wide cache kept
        # 1,024 more (0.3-0.7 MB each), so the target worker grew ~1.1 MB per SpecKV request
        # for hundreds of MB before levelling off (heaptrack, docs/reliability.md). With
        # vLLM's own cache doing the reuse, the global one only held memory.
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0",
    }


def main(argv: list[str] | None = None) -> None:
    # Our own handler on the "specapprox" logger: vLLM's and uvicorn's logging set-up replace
    # the root logger's handlers, which silently dropped our INFO lines (request log).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    ours = logging.getLogger("specapprox")
    ours.addHandler(handler)
    ours.propagate = False
    try:
        cfg = parse_config(argv)
        check_draft_tokenizer(cfg)
    except ConfigError as e:
        print(f"specapprox-serve: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    ours.setLevel(cfg.server.log_level.upper())
    os.chdir(Path(PROJECT_ROOT))
    for key, value in engine_environment(cfg.server.exit_on_engine_death).items():
        os.environ.setdefault(key, value)  # the operator's own setting wins
    # The engine processes load the same extra methods as this one (register() reads it).
    modules = [m for m in os.environ.get(POLICY_MODULES_ENV, "").split(",") if m]
    modules += [m for m in cfg.approx.policy_modules if m not in modules]
    if modules:
        os.environ[POLICY_MODULES_ENV] = ",".join(modules)
    signal.signal(signal.SIGTERM, _terminate_during_startup)
    try:
        code = asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        code = 130
    except ConfigError as e:  # refused once the engines could tell (serve() stopped them)
        print(f"specapprox-serve: {e}", file=sys.stderr)
        code = 2
    raise SystemExit(code)


if __name__ == "__main__":
    main()

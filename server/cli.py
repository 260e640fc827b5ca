"""``specapprox-serve``: start the engines and serve the OpenAI-compatible API.

Flags: ``--config FILE`` plus one flag per config key (``--target.max_model_len 4096``), and
the short forms ``--host``, ``--port``, ``--api-key``, ``--default-method``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from server.config import PROJECT_ROOT, ConfigError, _parse_scalar, env_name, leaf_keys, load_config

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


async def serve(cfg) -> None:
    import uvicorn

    from server.app import build_server_app
    from server.engines import draft_engine_args, needs_draft, start_engine, vllm_server_args

    vllm_args = vllm_server_args(cfg)
    from vllm.engine.arg_utils import AsyncEngineArgs

    # The draft starts first: each engine's Prometheus logger resets vLLM's `vllm:*` series
    # when it is created, and those series should describe the target.
    draft = start_engine(draft_engine_args(cfg), "draft") if needs_draft(cfg) else None
    target = None
    try:
        target = start_engine(AsyncEngineArgs.from_cli_args(vllm_args), "target")
        app, client = await build_server_app(cfg, vllm_args, target, draft)
        config = uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port,
                                log_level=cfg.server.log_level, access_log=False,
                                timeout_graceful_shutdown=30)
        server = uvicorn.Server(config)
        log.info("serving %s on http://%s:%d", cfg.server.served_model_name,
                 cfg.server.host, cfg.server.port)
        await server.serve()
    finally:
        for engine in (draft, target):
            if engine is not None:
                engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(f"specapprox-serve: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    os.chdir(Path(PROJECT_ROOT))
    # vLLM's CPU workers reserve one core for the front end by default, which on a 2-core
    # machine pins every engine's worker to core 0. Our engines take turns (draft, then
    # target), so let each use all cores unless the operator says otherwise.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    asyncio.run(serve(cfg))


if __name__ == "__main__":
    main()

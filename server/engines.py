"""Turning our config into vLLM engine arguments, and starting/stopping the engines.

The target's arguments go through vLLM's own server argument parser, so the resulting
``Namespace`` also drives vLLM's OpenAI app (``build_app`` / ``init_app_state``) exactly as
``vllm serve`` would; the draft engine is a second ``AsyncLLM`` in the same process.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from server.config import EngineConfig, ServerConfig
from specapprox_vllm.vllm_compat import (
    PENALTY_PROCESSOR_PATH,
    serve_arg_parser,
    validate_serve_args,
)
from specapprox_vllm.wire import CONNECTOR_CONFIG, WORKER_EXTENSION

log = logging.getLogger("specapprox.engines")
GiB = 1 << 30


def _engine_flags(e: EngineConfig) -> list[str]:
    flags = [
        "--model", e.model,
        "--dtype", e.dtype,
        "--max-model-len", str(e.max_model_len),
        "--kv-cache-memory-bytes", str(int(e.kv_cache_memory_gib * GiB)),
        "--max-num-seqs", str(e.max_num_seqs),
        "--seed", str(e.seed),
        "--tensor-parallel-size", str(e.tensor_parallel_size),
        "--enable-prefix-caching" if e.enable_prefix_caching else "--no-enable-prefix-caching",
        "--enable-chunked-prefill" if e.enable_chunked_prefill
        else "--no-enable-chunked-prefill",
        "--worker-extension-cls", WORKER_EXTENSION,
    ]
    if e.enforce_eager:
        flags.append("--enforce-eager")
    if e.max_num_batched_tokens is not None:
        flags += ["--max-num-batched-tokens", str(e.max_num_batched_tokens)]
    if e.block_size is not None:
        flags += ["--block-size", str(e.block_size)]
    if e.load_format != "auto":
        flags += ["--load-format", e.load_format]
    return flags


def target_flags(e: EngineConfig) -> list[str]:
    """The target's flags: its engine flags plus the SpecKV KV connector, which injects
    compacted KV into decode requests, and the logits processor that counts their penalties
    over the real prompt; both do nothing for any other request."""
    return _engine_flags(e) + ["--kv-transfer-config", json.dumps(CONNECTOR_CONFIG),
                               "--logits-processors", PENALTY_PROCESSOR_PATH]


def draft_flags(e: EngineConfig) -> list[str]:
    """A separate draft engine's flags: its engine flags plus the same KV connector, whose
    scheduler side caps a scoring draft request's prefix-cache hit before its first scoring
    row (``wire.prefix_cache_cap``). Without it, the next turn of a conversation hit the
    SpecPC window in the draft's cache, left its queries uncomputed and ran the draft again
    without the cache: a full second prefill."""
    return _engine_flags(e) + ["--kv-transfer-config", json.dumps(CONNECTOR_CONFIG)]


def vllm_server_args(cfg: ServerConfig) -> argparse.Namespace:
    """The ``Namespace`` ``vllm serve`` would build for the target engine."""
    flags = target_flags(cfg.target) + [
        "--served-model-name", cfg.server.served_model_name,
        "--host", cfg.server.host, "--port", str(cfg.server.port),
        "--disable-uvicorn-access-log",
        "--allowed-origins", json.dumps(cfg.server.cors_allowed_origins),
    ]
    if cfg.server.prompt_tokens_details:
        flags.append("--enable-prompt-tokens-details")
    args = serve_arg_parser().parse_args(flags)
    validate_serve_args(args)
    return args


def draft_engine_args(cfg: ServerConfig) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    draft = cfg.draft
    if draft.num_layers is not None:
        from specapprox_vllm.tools.truncate import truncated_checkpoint

        draft = draft.model_copy(update={"model": str(truncated_checkpoint(draft.model,
                                                                           draft.num_layers))})
    args = serve_arg_parser().parse_args(draft_flags(draft))
    return AsyncEngineArgs.from_cli_args(args)


def self_draft(cfg: ServerConfig) -> bool:
    """The target is its own draft, on its own engine (ALGORITHMS.md, "Self-draft")."""
    d = cfg.draft
    return d.enabled and d.share_target_engine and d.is_target(cfg.target)


def needs_draft(cfg: ServerConfig) -> bool:
    """A separate draft engine is started only when a method needs a draft that the target
    engine cannot be."""
    return cfg.draft.enabled and not self_draft(cfg)


def start_engine(engine_args: Any, name: str) -> Any:
    from vllm.v1.engine.async_llm import AsyncLLM

    log.info("starting %s engine (%s)", name, engine_args.model)
    return AsyncLLM.from_engine_args(engine_args)

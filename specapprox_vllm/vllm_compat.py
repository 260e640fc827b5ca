"""Every place where specapprox-vllm touches vLLM internals, in one module.

vLLM does not promise stability for the internals we rely on (attention-backend impl
signatures, scheduler request fields, the OpenAI app builders). This module pins the version
and names each patch point, and ``tests/test_vllm_compat.py`` checks that they still exist,
so an upgrade fails loudly instead of silently serving wrong results.
"""

from __future__ import annotations

from typing import Any

SUPPORTED_VLLM_SERIES = "0.32."

# (module, attribute) pairs the product uses; checked by tests/test_vllm_compat.py.
PATCH_POINTS: tuple[tuple[str, str], ...] = (
    ("vllm.entrypoints.launchers.app", "build_app"),
    ("vllm.entrypoints.launchers.api_server.app_state", "init_app_state"),
    ("vllm.entrypoints.launchers.cli_args", "make_arg_parser"),
    ("vllm.entrypoints.launchers.cli_args", "validate_parsed_serve_args"),
    ("vllm.v1.engine.async_llm", "AsyncLLM"),
    ("vllm.engine.arg_utils", "AsyncEngineArgs"),
    ("vllm.engine.protocol", "EngineClient"),
    # SpecPC draft capture
    ("vllm.v1.attention.backends.registry", "register_backend"),
    ("vllm.v1.attention.backends.registry", "AttentionBackendEnum"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
    # SpecKV: compacted KV injected into the decode request by an out-of-tree connector;
    # kept keys re-rotated with the model's own rotary module
    ("vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1"),
    ("vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorMetadata"),
    ("vllm.model_executor.layers.rotary_embedding.base", "RotaryEmbedding"),
    ("vllm.model_executor.layers.rotary_embedding.common", "ApplyRotaryEmb"),
    ("vllm.model_executor.layers.attention.attention", "Attention"),
    # per-engine metrics (server/metrics.py): stat loggers and scheduler stats
    ("vllm.v1.metrics.loggers", "StatLoggerManager"),
    ("vllm.v1.metrics.stats", "SchedulerStats"),
    # reliability (server/guard.py, server/state.py): engine processes, retryable 503s
    ("vllm.v1.engine.core_client", "BackgroundResources"),
    ("vllm.v1.engine.utils", "CoreEngineProcManager"),
    ("vllm.exceptions", "RetryableRequestError"),
)

# Signatures we wrap; a change here must fail the compat tests, not corrupt outputs.
IMPL_FORWARD_PARAMS = ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata",
                       "output")
PREPARE_INPUTS_PARAMS = ("self", "scheduler_output", "num_scheduled_tokens")
CPU_BACKEND_PATH = "specapprox_vllm.cpu_backend.CaptureCPUBackend"


class UnsupportedVLLMVersion(RuntimeError):
    pass


def vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def check_vllm_version(version: str | None = None) -> None:
    """Raise unless ``version`` (default: the installed vLLM) is 0.32.x."""
    version = version if version is not None else vllm_version()
    if not version.startswith(SUPPORTED_VLLM_SERIES):
        raise UnsupportedVLLMVersion(
            f"specapprox-vllm supports vLLM {SUPPORTED_VLLM_SERIES}x only, found {version}: "
            "its patch points (see specapprox_vllm/vllm_compat.py) are not verified there"
        )


def install_hooks() -> None:
    """Install the engine-side hooks. Called from :func:`specapprox_vllm.register` in every
    vLLM process: idempotent and import-light (the registry module imports no model code).

    The CPU_ATTN override is resolved lazily by vLLM, in the worker, when the model's
    attention layers are built; it does work only for requests flagged for capture.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)


_RUNNER_PATCHED = False


def step_extra_args(req_ids: list[str | None], requests: dict[str, Any]
                    ) -> dict[int, dict[str, Any]]:
    """Batch row -> ``SamplingParams.extra_args`` of the rows that have any, from the V1
    runner's own request state (the attention metadata carries no request ids)."""
    out = {}
    for i, rid in enumerate(req_ids):
        state = requests.get(rid) if rid is not None else None
        extra = getattr(getattr(state, "sampling_params", None), "extra_args", None)
        if extra:
            out[i] = extra
    return out


def engine_pids(engine: Any) -> list[int]:
    """PIDs of an ``AsyncLLM``'s engine-core processes (``engine_core.resources.
    engine_manager.processes``); empty when the engine runs in-process or the layout moved."""
    manager = getattr(getattr(getattr(engine, "engine_core", None), "resources", None),
                      "engine_manager", None)
    return [p.pid for p in getattr(manager, "processes", None) or [] if p.pid is not None]


def patch_model_runner() -> None:
    """Wrap the V1 model runner's ``_prepare_inputs`` to publish which batch rows belong to
    flagged requests (SpecPC draft capture, SpecKV scoring): attention metadata has no
    request ids.

    V1 runner only: on CUDA, vLLM 0.32 defaults to Model Runner V2, which needs the same
    publication from its ``prepare_attn`` (docs/design.md); the CPU build always runs V1.
    Called from the capture backend's impl constructor, i.e. in worker processes only.
    """
    global _RUNNER_PATCHED
    if _RUNNER_PATCHED:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from specapprox_vllm import capture, kv_compact

    original = GPUModelRunner._prepare_inputs

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):  # type: ignore[no-untyped-def]
        out = original(self, scheduler_output, num_scheduled_tokens)
        extras = step_extra_args(self.input_batch.req_ids[: self.input_batch.num_reqs],
                                 self.requests)
        capture.publish_step(extras)
        kv_compact.publish_step(extras, self)
        return out

    GPUModelRunner._prepare_inputs = _prepare_inputs
    _RUNNER_PATCHED = True


def make_capture_cpu_backend() -> type:
    """CPU_ATTN with post-attention hooks: SpecPC capture (:mod:`specapprox_vllm.capture`)
    and SpecKV compaction (:mod:`specapprox_vllm.kv_compact`)."""
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackend,
        CPUAttentionBackendImpl,
    )

    from specapprox_vllm.capture import capture_layer
    from specapprox_vllm.kv_compact import compact_layer

    class CaptureCPUImpl(CPUAttentionBackendImpl):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            patch_model_runner()

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,  # type: ignore[no-untyped-def]
                    *args, **kwargs):
            out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                  *args, **kwargs)
            capture_layer(self, layer, query, kv_cache, attn_metadata)
            compact_layer(self, layer, query, kv_cache, attn_metadata)
            return out

    class CaptureCPUBackend(CPUAttentionBackend):
        @staticmethod
        def get_impl_cls() -> type:
            return CaptureCPUImpl

    return CaptureCPUBackend

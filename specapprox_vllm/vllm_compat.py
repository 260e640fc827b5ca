"""Every place where specapprox-vllm touches vLLM internals, in one module.

vLLM does not promise stability for what we rely on (attention impls and metadata, the CPU
paged-KV layout, the runner's request state, rotary internals, the block pool and prefix-cache
lookup, stat loggers, the OpenAI app builders). Each is reached through a named function here,
:data:`PATCH_POINTS` lists the vLLM symbols behind each, and ``tests/test_vllm_compat.py`` tests
each, so an upgrade fails in one place. The rest of the product imports only vLLM's public API.

Engine-side hooks are installed by :func:`install_hooks` (from ``specapprox_vllm.register()``
in every vLLM process); the callbacks they call live in ``specapprox_vllm/worker``, which hands
them to :func:`make_cpu_backend`, so this module imports none of our worker code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

SUPPORTED_VLLM_SERIES = "0.32."
CPU_BACKEND_PATH = "specapprox_vllm.worker.cpu_backend.CaptureCPUBackend"
PENALTY_PROCESSOR_PATH = "specapprox_vllm.worker.penalties:RealPromptPenalties"

#: compat function -> the vLLM symbols (``module:attribute``) it relies on. Each function has
#: a test in tests/test_vllm_compat.py, and every symbol must still exist.
PATCH_POINTS: dict[str, tuple[str, ...]] = {
    "install_hooks": ("vllm.v1.attention.backends.registry:register_backend",
                      "vllm.v1.attention.backends.registry:AttentionBackendEnum"),
    "make_cpu_backend": ("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackend",
                         "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl"),
    "patch_model_runner": ("vllm.v1.worker.gpu_model_runner:GPUModelRunner",),
    "step_extra_args": ("vllm.v1.worker.gpu_input_batch:CachedRequestState",),
    "batch_row": ("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata",),
    "attention_scale": ("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl",),
    "paged_keys": ("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl",),
    "paged_values": ("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl",),
    "write_kv": ("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl",),
    "attention_layers": ("vllm.model_executor.layers.attention.attention:Attention",),
    "runner_attention_layers": ("vllm.model_executor.layers.attention.attention:Attention",
                                "vllm.config.compilation:CompilationConfig"),
    "sliding_window": ("vllm.model_executor.layers.attention.attention:Attention",),
    "rotary_for_layer": ("vllm.model_executor.layers.rotary_embedding.base:RotaryEmbedding",),
    "rerotate": ("vllm.model_executor.layers.rotary_embedding.common:ApplyRotaryEmb",),
    "check_rerotation": ("vllm.model_executor.layers.rotary_embedding.base:RotaryEmbedding",),
    "cap_prefix_cache_hits": ("vllm.v1.core.kv_cache_manager:KVCacheManager",),
    "block_pool_stats": ("vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorBase_V1",
                         "vllm.v1.core.block_pool:BlockPool"),
    "kv_geometry": ("vllm.config.cache:CacheConfig",),
    "kv_pool_blocks": ("vllm.config.cache:CacheConfig",),
    "generation_defaults": ("vllm.config.model:ModelConfig",),
    "make_penalty_processor": ("vllm.v1.sample.logits_processor:LogitsProcessor",
                               "vllm.v1.sample.logits_processor:BatchUpdate",
                               "vllm.v1.sample.logits_processor.builtin:process_dict_updates",
                               "vllm.v1.sample.ops.penalties:apply_all_penalties"),
    "stat_loggers": ("vllm.v1.metrics.loggers:StatLoggerManager",),
    "scheduler_view": ("vllm.v1.metrics.stats:SchedulerStats",),
    "engine_pids": ("vllm.v1.engine.core_client:BackgroundResources",
                    "vllm.v1.engine.utils:CoreEngineProcManager"),
    "serve_arg_parser": ("vllm.entrypoints.launchers.cli_args:make_arg_parser",
                         "vllm.utils.argparse_utils:FlexibleArgumentParser"),
    "validate_serve_args": ("vllm.entrypoints.launchers.cli_args:validate_parsed_serve_args",),
    "build_openai_app": ("vllm.entrypoints.launchers.app:build_app",
                         "vllm.entrypoints.launchers.api_server.app_state:init_app_state"),
}

# Signatures we wrap; a change here must fail the compat tests, not corrupt outputs.
IMPL_FORWARD_PARAMS = ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata",
                       "output")
PREPARE_INPUTS_PARAMS = ("self", "scheduler_output", "num_scheduled_tokens")
SUPPORTED_CPU_ISAS = ("vec",)


class UnsupportedVLLMVersion(RuntimeError): ...
class UnsupportedKVLayout(RuntimeError): ...
class UnsupportedRope(RuntimeError): ...


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


# ---------------------------------------------------------------- engine hooks (workers)
def install_hooks() -> None:
    """Point vLLM's CPU_ATTN backend at ours (resolved lazily, in the workers, when the
    model's attention layers are built). Idempotent and import-light."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)


StepHook = Callable[[Any, dict[int, dict[str, Any]]], None]
AttentionHook = Callable[[Any, Any, Tensor, Tensor, Any], None]
_RUNNER_PATCHED: list[StepHook] = []


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


def patch_model_runner(on_step: StepHook) -> None:
    """Wrap the V1 model runner's ``_prepare_inputs`` so that ``on_step(runner, extras)``
    learns, once per model step, which batch rows carry ``extra_args``.

    V1 runner only: on CUDA, vLLM 0.32 defaults to Model Runner V2, which needs the same
    publication from its ``prepare_attn`` (docs/design.md); the CPU build always runs V1.
    """
    if _RUNNER_PATCHED:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):  # type: ignore[no-untyped-def]
        out = original(self, scheduler_output, num_scheduled_tokens)
        batch = self.input_batch
        on_step(self, step_extra_args(batch.req_ids[: batch.num_reqs], self.requests))
        return out

    GPUModelRunner._prepare_inputs = _prepare_inputs
    _RUNNER_PATCHED.append(on_step)


def make_cpu_backend(after_attention: AttentionHook, on_step: StepHook) -> type:
    """CPU_ATTN whose ``forward`` calls ``after_attention(impl, layer, query, kv_cache,
    attn_metadata)`` once the real attention has run (the step's K/V are in the paged cache
    by then); its impl installs :func:`patch_model_runner` with ``on_step``."""
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackend,
        CPUAttentionBackendImpl,
    )

    class CaptureCPUImpl(CPUAttentionBackendImpl):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            patch_model_runner(on_step)

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,  # type: ignore[no-untyped-def]
                    *args, **kwargs):
            out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                  *args, **kwargs)
            after_attention(self, layer, query, kv_cache, attn_metadata)
            return out

    class CaptureCPUBackend(CPUAttentionBackend):
        @staticmethod
        def get_impl_cls() -> type:
            return CaptureCPUImpl

    return CaptureCPUBackend


@dataclass
class _Penalised:
    prompt: Tensor  # [L] the token ids the penalties count as the prompt
    before: list[int]  # output tokens that sit in the request's prompt (a continuation)
    outputs: list[int]  # the request's own running output list (vLLM appends to it)
    repetition: float
    presence: float
    frequency: float


def make_penalty_processor(key: str) -> type:
    """A v1 logits processor (``--logits-processors``) applying vLLM's own penalties
    (``apply_all_penalties``) to rows whose ``extra_args[key]`` names the prompt and earlier
    outputs they stand for (``prompt, before, repetition, presence, frequency``). vLLM runs
    it right before its own penalty step; the request carries neutral penalties."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates
    from vllm.v1.sample.ops.penalties import apply_all_penalties

    def state(params: Any, _prompt: Any, outputs: list[int]) -> _Penalised | None:
        spec = (params.extra_args or {}).get(key)
        if not spec:
            return None
        return _Penalised(torch.tensor(spec["prompt"], dtype=torch.int64),
                          list(spec.get("before", ())), outputs, float(spec["repetition"]),
                          float(spec["presence"]), float(spec["frequency"]))

    class PenaltyProcessor(LogitsProcessor):
        def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
            self.rows: dict[int, _Penalised] = {}

        def is_argmax_invariant(self) -> bool:
            return False  # penalties change the greedy choice

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            process_dict_updates(self.rows, batch_update, state)

        def apply(self, logits: Tensor) -> Tensor:
            rows = sorted(r for r in self.rows if r < logits.shape[0])
            if not rows:
                return logits
            got = [self.rows[r] for r in rows]
            vocab = logits.shape[1]
            prompts = torch.nn.utils.rnn.pad_sequence([g.prompt for g in got],
                                                      batch_first=True, padding_value=vocab)
            idx = torch.tensor(rows, device=logits.device)
            logits[idx] = apply_all_penalties(
                logits[idx], prompts.to(logits.device),
                torch.tensor([g.presence for g in got], device=logits.device),
                torch.tensor([g.frequency for g in got], device=logits.device),
                torch.tensor([g.repetition for g in got], device=logits.device),
                [[*g.before, *g.outputs] for g in got])
            return logits

    return PenaltyProcessor


@dataclass
class BatchRow:
    """One request's part of a model step, from the attention metadata: its query rows
    ``[q_start, q_end)`` in the flattened batch, the tokens with KV after the step, and its
    row of the block table."""

    q_start: int
    q_end: int
    seq_len: int
    block_table: Tensor

    @property
    def computed_before(self) -> int:
        """Tokens whose KV existed before this step (earlier chunks or prefix-cache hits)."""
        return self.seq_len - (self.q_end - self.q_start)

    def overlap(self, positions: range) -> range:
        """The positions among ``positions`` whose queries this step computes."""
        return range(max(self.computed_before, positions.start),
                     min(self.seq_len, positions.stop))

    def queries(self, query: Tensor, positions: range) -> Tensor:
        """This step's query rows at ``positions`` (a sub-range of :meth:`overlap`)."""
        first = self.q_start - self.computed_before
        return query[first + positions.start: first + positions.stop]


def batch_row(attn_metadata: Any, row: int) -> BatchRow | None:
    """Batch row ``row`` of this step (None when the step has no such row)."""
    qsl = attn_metadata.query_start_loc
    if row + 1 >= qsl.shape[0]:
        return None
    return BatchRow(int(qsl[row]), int(qsl[row + 1]), int(attn_metadata.seq_lens[row]),
                    attn_metadata.block_table[row])


def attention_scale(impl: Any) -> float:
    """The softmax scale the attention impl applies to ``q k^T``."""
    return float(impl.scale)


def _paged_read(layer: Any, kv_cache: Tensor, table: Tensor, pos: Tensor | int, part: int
                ) -> Tensor:
    """``[T, H_kv, D]`` keys (``part`` 0) or values (1) at ``pos``; an int ``n``: the first ``n``
    tokens, copied page by page (the draft's SpecPC scoring reads a prefix in every layer of
    every step). CPU_ATTN's ``[blocks, H_kv, block_size, 2*D]`` holds per (block, head) K then
    V; with ``isa == "vec"`` (fp32, or no AMX) K is ``[D, block_size]``, V ``[block_size, D]``
    (tested against the backend's writer); ``amx`` (bf16 on AMX) packs K otherwise: refused."""
    isa = getattr(layer, "isa", None)
    if isa not in SUPPORTED_CPU_ISAS:
        raise UnsupportedKVLayout(
            f"paged-KV reader supports CPU_ATTN isa {SUPPORTED_CPU_ISAS}, got {isa!r}: run the "
            "engine in float32 (bf16 on AMX CPUs uses the packed 'amx' layout)")
    nb, kvh, bs, d = *kv_cache.shape[:3], kv_cache.shape[3] // 2
    half = kv_cache.view(nb, kvh, 2, bs * d)[:, :, part]
    pages = half.view(nb, kvh, d, bs) if part == 0 else half.view(nb, kvh, bs, d)
    if isinstance(pos, int):
        blocks = pages[table[:-(-pos // bs)].long()]  # K [n, H, D, bs], V [n, H, bs, D]
        blocks = blocks.permute(0, 3, 1, 2) if part == 0 else blocks.transpose(1, 2)
        return blocks.flatten(0, 1)[:pos]
    if part == 0:
        return pages[table[pos // bs].long(), :, :, pos % bs]
    return pages[table[pos // bs].long(), :, pos % bs, :]


def paged_keys(layer: Any, kv_cache: Tensor, table: Tensor, pos: Tensor | int) -> Tensor:
    """Keys of one request's tokens from the paged cache (see :func:`_paged_read`)."""
    return _paged_read(layer, kv_cache, table, pos, 0)


def paged_values(layer: Any, kv_cache: Tensor, table: Tensor, pos: Tensor | int) -> Tensor:
    """Values of one request's tokens from the paged cache (see :func:`_paged_read`)."""
    return _paged_read(layer, kv_cache, table, pos, 1)


def write_kv(layer: Any, keys: Tensor, values: Tensor, slots: Tensor) -> None:
    """Write ``[T, H_kv, D]`` K/V rows into the layer's paged cache at flat ``slots``
    (``block * block_size + offset``) with the backend's own writer."""
    layer.impl.do_kv_cache_update(layer, keys, values, layer.kv_cache, slots)


def attention_layers(forward_context: Any) -> dict[str, Any]:
    """The model's attention layers by name (what a KV connector loads into)."""
    from vllm.model_executor.layers.attention.attention import Attention

    return {n: m for n, m in forward_context.no_compile_layers.items()
            if isinstance(m, Attention)}


def runner_attention_layers(runner: Any) -> dict[str, Any]:
    """The model's attention layers by name, from a worker's model runner (its compilation
    config's static forward context: what every forward context is built from)."""
    return attention_layers(SimpleNamespace(
        no_compile_layers=runner.compilation_config.static_forward_context))


def sliding_window(layer: Any) -> int | None:
    """The attention layer's sliding window in tokens (None: it attends to the whole
    prefix), per layer as vLLM resolved it (model-level or per-layer config)."""
    window = getattr(layer, "sliding_window", None)
    return int(window) if window is not None else None


# ---------------------------------------------------------------- rotary embeddings
def rotary_for_layer(runner: Any, layer_name: str) -> Any:
    """The rotary module of the attention block owning ``layer_name`` (``...self_attn``),
    refused unless it is a standard position-independent RoPE that re-rotation reproduces."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    parent = runner.get_model().get_submodule(layer_name.rsplit(".", 1)[0])
    rope = getattr(parent, "rotary_emb", None)
    if not isinstance(rope, RotaryEmbedding) or (
            type(rope).forward_native is not RotaryEmbedding.forward_native):
        raise UnsupportedRope(
            f"{layer_name}: KV compaction re-rotates keys, which needs a standard "
            f"position-independent RoPE; found {type(rope).__name__}")
    check_rerotation(rope)
    return rope


def rerotate(keys: Tensor, rope: Any, delta: int) -> Tensor:
    """Post-RoPE keys ``[T, H, D]`` at positions ``p`` -> the same keys at ``p - delta``."""
    from vllm.model_executor.layers.rotary_embedding.common import ApplyRotaryEmb

    if delta == 0:
        return keys
    rot = rope.rotary_dim
    cos, sin = rope.cos_sin_cache[delta].float().chunk(2, dim=-1)
    x = keys.float()
    t = x.shape[0]
    turned = ApplyRotaryEmb.forward_static(x[..., :rot], cos.expand(t, -1),
                                           (-sin).expand(t, -1), rope.is_neox_style)
    return torch.cat([turned, x[..., rot:]], dim=-1).to(keys.dtype)


def check_rerotation(rope: Any) -> None:
    """Refuse a RoPE that :func:`rerotate` does not reproduce numerically."""
    g = torch.Generator().manual_seed(0)
    t, h, d = 4, 2, rope.head_size
    k = torch.randn(t, h * d, generator=g)
    p = torch.tensor([700, 701, 1500, 2047]).clamp_max(rope.cos_sin_cache.shape[0] - 1)
    delta = int(p.min()) - 3
    dummy = torch.zeros(t, h * d)
    cache = rope.cos_sin_cache.float()
    _, at_p = rope.forward_static(p, dummy, k.clone(), d, rope.rotary_dim, cache,
                                  rope.is_neox_style)
    _, want = rope.forward_static(p - delta, dummy, k.clone(), d, rope.rotary_dim, cache,
                                  rope.is_neox_style)
    err = (rerotate(at_p.view(t, h, d), rope, delta) - want.view(t, h, d)).abs().max().item()
    if err > 1e-3:
        raise UnsupportedRope(
            f"its RoPE ({type(rope).__name__}) is not reproduced by re-rotating keys (max "
            f"error {err:.1e}); KV compaction moves the kept keys to new positions")


# ---------------------------------------------------------------- scheduler and engine
_HITS_CAPPED: list[Callable[[Any], int | None]] = []


def cap_prefix_cache_hits(cap_for: Callable[[Any], int | None]) -> None:
    """Wrap ``KVCacheManager.get_computed_blocks``: a request reads at most ``cap_for(req)``
    tokens (whole blocks) of prefix cache, so a scoring request computes its scoring rows."""
    installed, _HITS_CAPPED[:] = bool(_HITS_CAPPED), [cap_for]  # the latest ``cap_for`` rules
    if installed:
        return
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    original = KVCacheManager.get_computed_blocks

    def get_computed_blocks(self, request):  # type: ignore[no-untyped-def]
        blocks, hit, boundary = original(self, request)
        cap = _HITS_CAPPED[0](request) if hit else None
        if cap is None or hit <= cap or len(blocks.blocks) != 1:
            return blocks, hit, boundary
        keep = cap // (block_size := hit // len(blocks.blocks[0]))
        kept = self.create_kv_cache_blocks((list(blocks.blocks[0][:keep]),))
        return kept, keep * block_size, min(boundary, keep * block_size)

    KVCacheManager.get_computed_blocks = get_computed_blocks


def block_pool_stats(connector: Any) -> tuple[int, int] | None:
    """(free blocks, all blocks) of the KV pool, from a scheduler-side KV connector."""
    pool = getattr(getattr(connector, "_kv_cache_manager", None), "block_pool", None)
    return None if pool is None else (pool.get_num_free_blocks(), pool.num_gpu_blocks)


@dataclass
class KVGeometry:
    block_size: int  # tokens per KV block
    num_blocks: int | None  # blocks in the pool (None before the engine has profiled)
    num_layers: int
    token_bytes: int  # one token's K and V over all layers and KV heads


def kv_pool_blocks(engine: Any) -> int | None:
    """Blocks in an ``AsyncLLM``'s KV pool, null block 0 included (None before sizing)."""
    cache = getattr(getattr(engine, "vllm_config", None), "cache_config", None)
    return getattr(cache, "num_gpu_blocks", None)


def kv_geometry(engine: Any) -> KVGeometry:
    """An ``AsyncLLM``'s KV-cache shape (for usage.approx byte counts and state routes)."""
    model = engine.model_config
    layers = int(model.hf_config.num_hidden_layers)
    token_bytes = (2 * layers * model.get_total_num_kv_heads() * model.get_head_size()
                   * model.dtype.itemsize)
    return KVGeometry(int(engine.vllm_config.cache_config.block_size), kv_pool_blocks(engine),
                      layers, token_bytes)


def generation_defaults(engine: Any) -> dict[str, Any]:
    """A checkpoint's sampling defaults, as vLLM's OpenAI serving reads them."""
    model = getattr(engine, "model_config", None)
    return dict(model.get_diff_sampling_param()) if model is not None else {}


def stat_loggers(engine: Any) -> list[Any] | None:
    """An ``AsyncLLM``'s stat loggers (None: stats disabled); appending adds a logger."""
    loggers = getattr(getattr(engine, "logger_manager", None), "stat_loggers", None)
    return loggers if isinstance(loggers, list) else None


@dataclass
class SchedulerView:
    waiting: int
    running: int
    kv_cache_usage: float


def scheduler_view(stats: Any) -> SchedulerView:
    """The fields of vLLM's ``SchedulerStats`` our metrics read."""
    return SchedulerView(stats.num_waiting_reqs + stats.num_skipped_waiting_reqs,
                         stats.num_running_reqs, float(stats.kv_cache_usage))


def engine_pids(engine: Any) -> list[int]:
    """PIDs of an ``AsyncLLM``'s engine-core processes (empty when in-process)."""
    manager = getattr(getattr(getattr(engine, "engine_core", None), "resources", None),
                      "engine_manager", None)
    return [p.pid for p in getattr(manager, "processes", None) or [] if p.pid is not None]


# ---------------------------------------------------------------- OpenAI front end
def serve_arg_parser() -> Any:
    """vLLM's ``vllm serve`` argument parser (its ``Namespace`` drives the OpenAI app)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def validate_serve_args(args: Any) -> None:
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    validate_parsed_serve_args(args)


async def build_openai_app(args: Any, engine_client: Any, supported_tasks: Any,
                           model_config: Any) -> Any:
    """vLLM's own OpenAI FastAPI app around ``engine_client``, as ``vllm serve`` builds it."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    app = build_app(args, supported_tasks, model_config)
    await init_app_state(engine_client, app.state, args, supported_tasks)
    return app

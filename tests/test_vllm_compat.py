"""One test per vLLM patch point (``vllm_compat.PATCH_POINTS``): each function of the compat
module is exercised against the installed vLLM's own classes, so that an upgrade which moves a
field, a layout or a signature fails here, in one place, rather than corrupting outputs.
Engine-level behaviour (hooks in a running engine) is covered end to end by
tests/test_speckv_vllm.py and tests/test_specpc_vllm.py against the HF referee."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from types import SimpleNamespace

import pytest
import torch

import specapprox_vllm
from specapprox_vllm import vllm_compat

SYMBOLS = sorted({s for syms in vllm_compat.PATCH_POINTS.values() for s in syms})


def test_every_patch_point_is_a_compat_function_with_a_test() -> None:
    here = sys.modules[__name__]
    for name in vllm_compat.PATCH_POINTS:
        assert callable(getattr(vllm_compat, name, None)), f"vllm_compat.{name} is missing"
        assert callable(getattr(here, f"test_{name}", None)), f"no test_{name} here"


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_patch_point_symbols_exist(symbol: str) -> None:
    module, attr = symbol.split(":")
    assert hasattr(importlib.import_module(module), attr), f"{symbol} is gone"


# ---------------------------------------------------------------- engine hooks
def test_install_hooks() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from specapprox_vllm.worker.cpu_backend import CaptureCPUBackend

    specapprox_vllm.register()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == vllm_compat.CPU_BACKEND_PATH
    assert AttentionBackendEnum.CPU_ATTN.get_class() is CaptureCPUBackend


def test_make_cpu_backend() -> None:
    """The backend keeps CPU_ATTN's forward signature, which the override wraps."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    fwd = tuple(inspect.signature(CPUAttentionBackendImpl.forward).parameters)
    assert fwd[: len(vllm_compat.IMPL_FORWARD_PARAMS)] == vllm_compat.IMPL_FORWARD_PARAMS
    backend = vllm_compat.make_cpu_backend(lambda *a: None, lambda *a: None)
    impl = backend.get_impl_cls()
    assert impl.__name__ == "CaptureCPUImpl" and issubclass(impl, CPUAttentionBackendImpl)


def test_patch_model_runner() -> None:
    """The wrapped method keeps its parameters, and the runner state the wrapper reads
    (``input_batch.req_ids``, ``input_batch.num_reqs``, ``requests``) is still there."""
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    prep = tuple(inspect.signature(GPUModelRunner._prepare_inputs).parameters)
    assert prep == vllm_compat.PREPARE_INPUTS_PARAMS
    init = inspect.getsource(GPUModelRunner.__init__)
    assert "self.input_batch" in init and "self.requests" in init
    assert isinstance(inspect.getattr_static(InputBatch, "req_ids"), property)
    assert isinstance(inspect.getattr_static(InputBatch, "num_reqs"), property)


def test_step_extra_args() -> None:
    from vllm import SamplingParams
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    assert "sampling_params" in {f.name for f in dataclasses.fields(CachedRequestState)}
    flagged = SamplingParams(extra_args={"k": 1})
    requests = {"a": SimpleNamespace(sampling_params=SamplingParams()),
                "b": SimpleNamespace(sampling_params=flagged)}
    assert vllm_compat.step_extra_args(["a", None, "b"], requests) == {2: {"k": 1}}


def test_batch_row() -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    table = torch.tensor([[3, 4, 0], [7, 0, 0]])
    meta = CPUAttentionMetadata(
        num_actual_tokens=7, max_query_len=6, query_start_loc=torch.tensor([0, 6, 7]),
        max_seq_len=200, seq_lens=torch.tensor([200, 41]), block_table=table,
        slot_mapping=torch.zeros(7, dtype=torch.long), scheduler_metadata=None)
    row = vllm_compat.batch_row(meta, 0)
    assert (row.q_start, row.q_end, row.seq_len, row.computed_before) == (0, 6, 200, 194)
    assert torch.equal(row.block_table, table[0])
    assert vllm_compat.batch_row(meta, 1).computed_before == 40
    assert vllm_compat.batch_row(meta, 2) is None


def _cpu_impl(num_heads: int = 4, num_kv_heads: int = 2, head_size: int = 64):
    """A real CPU_ATTN impl, built outside an engine (only the model dtype is asked of the
    current vLLM config)."""
    from unittest import mock

    from vllm.v1.attention.backends import cpu_attn

    config = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32))
    with mock.patch.object(cpu_attn, "get_current_vllm_config", lambda: config):
        return cpu_attn.CPUAttentionBackendImpl(num_heads, head_size, 0.125, num_kv_heads,
                                                None, None, "auto")


def test_attention_scale() -> None:
    assert vllm_compat.attention_scale(_cpu_impl()) == 0.125


def _round_trip():
    """K/V written by CPU_ATTN's own writer, read back by position."""
    blocks, h_kv, bs, d = 6, 2, 32, 64
    impl = _cpu_impl(num_kv_heads=h_kv, head_size=d)
    cache = torch.zeros(blocks, h_kv, bs, 2 * d)
    layer = SimpleNamespace(isa="vec", _k_scale_float=1.0, _v_scale_float=1.0, kv_cache=cache,
                            impl=impl)
    g = torch.Generator().manual_seed(0)
    n = 70
    k, v = torch.randn(n, h_kv, d, generator=g), torch.randn(n, h_kv, d, generator=g)
    table = torch.tensor([4, 1, 5], dtype=torch.int32)  # positions 0..95 in blocks 4, 1, 5
    pos = torch.arange(n)
    slots = table[pos // bs].long() * bs + pos % bs
    vllm_compat.write_kv(layer, k, v, slots)
    return layer, cache, table, k, v


def test_write_kv() -> None:
    _, cache, table, k, _ = _round_trip()
    assert cache[table[0].item()].abs().sum() > 0 and cache[0].abs().sum() == 0


def test_paged_keys() -> None:
    layer, cache, table, k, _ = _round_trip()
    pos = torch.tensor([0, 31, 32, 69, 5])
    assert torch.equal(vllm_compat.paged_keys(layer, cache, table, pos), k[pos])
    for n in (0, 1, 31, 32, 33, 70):  # a prefix, read page by page
        assert torch.equal(vllm_compat.paged_keys(layer, cache, table, n), k[:n])
    with pytest.raises(vllm_compat.UnsupportedKVLayout, match="amx"):
        vllm_compat.paged_keys(SimpleNamespace(isa="amx"), cache, table, pos)


def test_paged_values() -> None:
    layer, cache, table, _, v = _round_trip()
    pos = torch.tensor([69, 0, 33, 32, 31])
    assert torch.equal(vllm_compat.paged_values(layer, cache, table, pos), v[pos])
    for n in (0, 1, 31, 32, 33, 70):
        assert torch.equal(vllm_compat.paged_values(layer, cache, table, n), v[:n])


def test_attention_layers() -> None:
    from vllm.forward_context import ForwardContext
    from vllm.model_executor.layers.attention.attention import Attention

    assert "no_compile_layers" in {f.name for f in dataclasses.fields(ForwardContext)}
    attn = Attention.__new__(Attention)
    ctx = SimpleNamespace(no_compile_layers={"model.layers.0.self_attn.attn": attn,
                                             "model.layers.0.mlp": torch.nn.Linear(2, 2)})
    assert vllm_compat.attention_layers(ctx) == {"model.layers.0.self_attn.attn": attn}


def test_runner_attention_layers() -> None:
    from vllm.config.compilation import CompilationConfig
    from vllm.model_executor.layers.attention.attention import Attention

    assert "static_forward_context" in {f.name for f in dataclasses.fields(CompilationConfig)}
    attn = Attention.__new__(Attention)
    runner = SimpleNamespace(compilation_config=SimpleNamespace(static_forward_context={
        "model.layers.0.self_attn.attn": attn, "model.layers.0.mlp": torch.nn.Linear(2, 2)}))
    assert vllm_compat.runner_attention_layers(runner) == {"model.layers.0.self_attn.attn": attn}


def test_sliding_window() -> None:
    """vLLM's Attention resolves the per-layer or model-level window into ``sliding_window``
    (None: full attention); its constructor still takes it."""
    import inspect

    from vllm.model_executor.layers.attention.attention import Attention

    params = inspect.signature(Attention.__init__).parameters
    assert "per_layer_sliding_window" in params and "cache_config" in params
    assert "self.sliding_window = sliding_window" in inspect.getsource(Attention.__init__)
    assert vllm_compat.sliding_window(SimpleNamespace(sliding_window=None)) is None
    assert vllm_compat.sliding_window(SimpleNamespace(sliding_window=4096)) == 4096


def test_generation_defaults(tmp_path, smollm2_dir) -> None:
    """The penalties a checkpoint's generation_config.json sets, as vLLM's serving code reads
    them (ModelConfig.get_diff_sampling_param on a real ModelConfig of a copied folder)."""
    import json
    import shutil

    from vllm.config import ModelConfig

    for f in smollm2_dir.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copyfile(f, tmp_path / f.name)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    gen.update(repetition_penalty=1.3, temperature=0.7)
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    engine = SimpleNamespace(model_config=ModelConfig(model=str(tmp_path),
                                                      tokenizer=str(tmp_path)))
    assert vllm_compat.generation_defaults(engine) == {"repetition_penalty": 1.3,
                                                        "temperature": 0.7}
    assert vllm_compat.generation_defaults(SimpleNamespace()) == {}


def naive_penalties(logits: torch.Tensor, prompt: list[int], outputs: list[int],
                    repetition: float, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence/frequency penalties over the outputs and the CTRL/HF repetition
    penalty over prompt and outputs, token by token (the independent expectation)."""
    out = logits.clone()
    for tok in set(prompt) | set(outputs):
        out[tok] = out[tok] / repetition if out[tok] > 0 else out[tok] * repetition
    for tok in set(outputs):
        out[tok] -= frequency * outputs.count(tok) + presence
    return out


def test_make_penalty_processor() -> None:
    """Rows flagged in extra_args get the penalties over the prompt and outputs they name
    (``before`` + the live output list), equal to the naive penalties; other rows are left
    alone; a removed request stops being penalised."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    cls = vllm_compat.make_penalty_processor("k")
    proc = cls(None, torch.device("cpu"), False)
    assert not proc.is_argmax_invariant()
    spec = {"prompt": [3, 5, 5, 7], "before": [9, 3], "repetition": 1.3, "presence": 0.25,
            "frequency": 0.5}
    live: list[int] = [11]
    flagged = SamplingParams(max_tokens=4, extra_args={"k": spec})
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[
        (0, SamplingParams(max_tokens=4), [1, 2], []), (1, flagged, [0, 0, 0], live)]))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 16, generator=g) * 3
    live.append(9)  # vLLM appends sampled tokens to the list it handed over
    got = proc.apply(logits.clone())
    assert torch.equal(got[0], logits[0])
    want = naive_penalties(logits[1], spec["prompt"], [9, 3, 11, 9], 1.3, 0.25, 0.5)
    assert torch.allclose(got[1], want, atol=1e-6), (got[1], want)
    proc.update_state(BatchUpdate(batch_size=1, removed=[1], moved=[], added=[]))
    assert torch.equal(proc.apply(logits.clone()), logits)


def _rope(scaling: dict | None = None, neox: bool = True):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    params = {"rope_theta": 10000.0, **({"rope_type": "default"} | (scaling or {}))}
    with set_current_vllm_config(VllmConfig()):
        return get_rope(64, max_position=4096, is_neox_style=neox, rope_parameters=params,
                        dtype=torch.float32)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 512}


def test_check_rerotation() -> None:
    """Kept keys are moved from position p to p - delta with vLLM's own rotary code; the
    self-check that guards it must pass for the standard rope and llama3 scaling."""
    for scaling, neox in ((None, True), (None, False), (LLAMA3, True)):
        vllm_compat.check_rerotation(_rope(scaling, neox))
    # YaRN scales its cos/sin cache (mscale): re-rotating by delta would scale keys again
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    with pytest.raises(vllm_compat.UnsupportedRope, match="YaRNScalingRotaryEmbedding"):
        vllm_compat.check_rerotation(_rope(yarn))


def test_rerotate() -> None:
    """Keys rotated at p by vLLM's rotary module, re-rotated by delta, equal the keys that
    module rotates at p - delta (llama3 scaling, GPT-J style pairs)."""
    rope = _rope(LLAMA3, neox=False)
    raw = torch.randn(3, 2 * 64, generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([300, 1000, 3000])
    cache = rope.cos_sin_cache.float()

    def rotate(p: torch.Tensor) -> torch.Tensor:
        _, k = rope.forward_static(p, torch.zeros_like(raw), raw.clone(), 64, rope.rotary_dim,
                                   cache, rope.is_neox_style)
        return k.view(3, 2, 64)

    keys = rotate(pos)
    assert vllm_compat.rerotate(keys, rope, 0) is keys
    # fp32 sin/cos at positions in the thousands: the product's own self-check bound (1e-3)
    assert torch.allclose(vllm_compat.rerotate(keys, rope, 250), rotate(pos - 250), atol=1e-3)


def test_rotary_for_layer() -> None:
    attn = torch.nn.Module()
    attn.rotary_emb = _rope()
    model = torch.nn.Module()
    model.add_module("self_attn", attn)
    runner = SimpleNamespace(get_model=lambda: model)
    assert vllm_compat.rotary_for_layer(runner, "self_attn.attn") is attn.rotary_emb

    class Shifted(type(attn.rotary_emb)):
        def forward_native(self, *args, **kwargs):  # position-dependent: not re-rotatable
            return super().forward_native(*args, **kwargs)

    attn.rotary_emb.__class__ = Shifted
    with pytest.raises(vllm_compat.UnsupportedRope, match="Shifted"):
        vllm_compat.rotary_for_layer(runner, "self_attn.attn")


# ---------------------------------------------------------------- scheduler and engine
def test_block_pool_stats() -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    assert "_kv_cache_manager" in inspect.getsource(KVConnectorBase_V1.__init__)
    assert "self.block_pool" in inspect.getsource(KVCacheManager.__init__)
    pool = BlockPool(num_gpu_blocks=10, enable_caching=False, hash_block_size=16)
    connector = SimpleNamespace(_kv_cache_manager=SimpleNamespace(block_pool=pool))
    assert vllm_compat.block_pool_stats(connector) == (9, 10)  # block 0 is the null block
    assert vllm_compat.block_pool_stats(SimpleNamespace(_kv_cache_manager=None)) is None


def test_cap_prefix_cache_hits() -> None:
    """A real KVCacheManager: a prompt of 100 tokens cached in 16-token blocks gives a second
    identical request 96 tokens of hits; capped at 40 it reads 2 whole blocks (32 tokens),
    the same blocks as the uncapped lookup's first two; requests without a cap, or with a cap
    beyond the hit, are untouched; the uncached path (caching off) is untouched too."""
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.request import Request

    bs = 16
    init_none_hash(sha256)
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=1, head_size=8, dtype=torch.float32)
    config = KVCacheConfig(num_blocks=64, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
    hasher = get_request_block_hasher(bs, sha256)

    def request(rid: str, cap: int | None = None) -> Request:
        extra = {"cap": cap} if cap is not None else None
        return Request(rid, list(range(100)), SamplingParams(max_tokens=4, extra_args=extra),
                       None, block_hasher=hasher)

    previous = list(vllm_compat._HITS_CAPPED)
    vllm_compat.cap_prefix_cache_hits(
        lambda r: (r.sampling_params.extra_args or {}).get("cap"))
    try:
        manager = KVCacheManager(config, max_model_len=1024, scheduler_block_size=bs,
                                 hash_block_size=bs, enable_caching=True)
        first = request("a")
        blocks, hit, _ = manager.get_computed_blocks(first)
        assert hit == 0
        manager.allocate_slots(first, 100, hit, blocks)
        manager.free(first)
        full, hit, _ = manager.get_computed_blocks(request("b"))
        assert hit == 96 and len(full.blocks[0]) == 6
        for cap, want in [(40, 32), (32, 32), (31, 16), (0, 0), (96, 96), (500, 96)]:
            capped, hit, boundary = manager.get_computed_blocks(request(f"c{cap}", cap))
            assert hit == want and boundary == 0, cap
            assert [b.block_id for b in capped.blocks[0]] == [
                b.block_id for b in full.blocks[0][: want // bs]]
        off = KVCacheManager(config, max_model_len=1024, scheduler_block_size=bs,
                             hash_block_size=bs, enable_caching=False)
        assert off.get_computed_blocks(request("d", 40))[1] == 0
    finally:
        vllm_compat._HITS_CAPPED[:] = previous or [lambda r: None]


def _fake_engine(num_blocks: int | None = 100):
    from vllm.config.cache import CacheConfig

    cache = CacheConfig(block_size=32)
    cache.num_gpu_blocks = num_blocks
    model = SimpleNamespace(hf_config=SimpleNamespace(num_hidden_layers=30),
                            get_total_num_kv_heads=lambda: 3, get_head_size=lambda: 64,
                            dtype=torch.float32)
    return SimpleNamespace(vllm_config=SimpleNamespace(cache_config=cache), model_config=model)


def test_kv_pool_blocks() -> None:
    assert vllm_compat.kv_pool_blocks(_fake_engine(100)) == 100
    assert vllm_compat.kv_pool_blocks(SimpleNamespace()) is None


def test_kv_geometry() -> None:
    from vllm.config import ModelConfig

    for name in ("get_total_num_kv_heads", "get_head_size"):
        assert callable(getattr(ModelConfig, name))
    geo = vllm_compat.kv_geometry(_fake_engine())
    assert (geo.block_size, geo.num_blocks, geo.num_layers) == (32, 100, 30)
    assert geo.token_bytes == 2 * 30 * 3 * 64 * 4


def test_stat_loggers() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerManager

    assert "self.logger_manager" in inspect.getsource(AsyncLLM.__init__)
    assert "self.stat_loggers" in inspect.getsource(StatLoggerManager.__init__)
    loggers: list = []
    engine = SimpleNamespace(logger_manager=SimpleNamespace(stat_loggers=loggers))
    assert vllm_compat.stat_loggers(engine) is loggers
    assert vllm_compat.stat_loggers(SimpleNamespace(logger_manager=None)) is None


def test_scheduler_view() -> None:
    """The fields of SchedulerStats that our metrics read."""
    from vllm.v1.metrics.stats import SchedulerStats

    names = {f.name for f in dataclasses.fields(SchedulerStats)}
    assert {"num_running_reqs", "num_waiting_reqs", "num_skipped_waiting_reqs",
            "kv_cache_usage"} <= names
    stats = SchedulerStats(num_running_reqs=2, num_waiting_reqs=3, num_skipped_waiting_reqs=1,
                           kv_cache_usage=0.25)
    view = vllm_compat.scheduler_view(stats)
    assert (view.running, view.waiting, view.kv_cache_usage) == (2, 4, 0.25)


def test_engine_pids() -> None:
    from vllm.v1.engine.core_client import BackgroundResources
    from vllm.v1.engine.utils import CoreEngineProcManager

    assert "engine_manager" in {f.name for f in dataclasses.fields(BackgroundResources)}
    assert "self.processes" in inspect.getsource(CoreEngineProcManager.__init__)
    procs = [SimpleNamespace(pid=11), SimpleNamespace(pid=None)]
    engine = SimpleNamespace(engine_core=SimpleNamespace(resources=SimpleNamespace(
        engine_manager=SimpleNamespace(processes=procs))))
    assert vllm_compat.engine_pids(engine) == [11]
    assert vllm_compat.engine_pids(SimpleNamespace()) == []


# ---------------------------------------------------------------- OpenAI front end
def test_serve_arg_parser() -> None:
    args = vllm_compat.serve_arg_parser().parse_args(
        ["--model", "m", "--served-model-name", "x", "--port", "8123"])
    assert (args.model, args.port, args.served_model_name) == ("m", 8123, ["x"])


def test_validate_serve_args() -> None:
    args = vllm_compat.serve_arg_parser().parse_args(["--model", "m"])
    vllm_compat.validate_serve_args(args)


def test_build_openai_app() -> None:
    """The builders keep the parameters the compat function passes (the running app is
    exercised by every server test)."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    assert list(inspect.signature(build_app).parameters)[:3] == [
        "args", "supported_tasks", "model_config"]
    assert list(inspect.signature(init_app_state).parameters)[:4] == [
        "engine_client", "state", "args", "supported_tasks"]
    assert inspect.iscoroutinefunction(init_app_state)

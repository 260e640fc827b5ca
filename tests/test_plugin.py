"""The vLLM plugin entry point, its version pin, and the vLLM patch points we depend on."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

import pytest

import specapprox_vllm
from specapprox_vllm import vllm_compat


def test_entry_point_is_registered_for_vllm() -> None:
    eps = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert eps["specapprox"].value == "specapprox_vllm:register"
    assert eps["specapprox"].load() is specapprox_vllm.register


def test_vllm_loads_our_plugin() -> None:
    from vllm.plugins import load_plugins_by_group

    plugins = load_plugins_by_group("vllm.general_plugins")
    assert plugins["specapprox"] is specapprox_vllm.register


def test_register_is_idempotent() -> None:
    specapprox_vllm.register()
    specapprox_vllm.register()


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_other_vllm_versions_fail_loudly(version: str) -> None:
    with pytest.raises(vllm_compat.UnsupportedVLLMVersion, match=version):
        vllm_compat.check_vllm_version(version)


def test_installed_vllm_is_supported() -> None:
    vllm_compat.check_vllm_version()
    assert vllm_compat.vllm_version().startswith("0.32.")


@pytest.mark.parametrize(("module", "attr"), vllm_compat.PATCH_POINTS)
def test_patch_points_exist(module: str, attr: str) -> None:
    assert hasattr(importlib.import_module(module), attr), f"{module}.{attr} is gone"


def test_wrapped_signatures_are_unchanged() -> None:
    """The capture backend and runner wrapper assume these parameter lists."""
    import inspect

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    fwd = tuple(inspect.signature(CPUAttentionBackendImpl.forward).parameters)
    assert fwd[: len(vllm_compat.IMPL_FORWARD_PARAMS)] == vllm_compat.IMPL_FORWARD_PARAMS
    prep = tuple(inspect.signature(GPUModelRunner._prepare_inputs).parameters)
    assert prep == vllm_compat.PREPARE_INPUTS_PARAMS


def test_capture_backend_overrides_cpu_attn() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from specapprox_vllm.cpu_backend import CaptureCPUBackend

    specapprox_vllm.register()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == vllm_compat.CPU_BACKEND_PATH
    assert AttentionBackendEnum.CPU_ATTN.get_class() is CaptureCPUBackend
    assert CaptureCPUBackend.get_impl_cls().__name__ == "CaptureCPUImpl"


def test_scheduler_stats_fields_used_by_metrics() -> None:
    import dataclasses

    from vllm.v1.metrics.stats import SchedulerStats

    names = {f.name for f in dataclasses.fields(SchedulerStats)}
    assert {"num_running_reqs", "num_waiting_reqs", "num_skipped_waiting_reqs",
            "kv_cache_usage"} <= names


def test_kv_connector_implements_vllms_interface() -> None:
    """The SpecKV connector loads through vLLM's factory and leaves nothing abstract; the
    hooks it relies on keep their parameter lists."""
    import inspect

    from vllm.config.kv_transfer import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from specapprox_vllm.kv_connector import CONNECTOR_CONFIG, SpecApproxConnector

    cls = KVConnectorFactory.get_connector_class(KVTransferConfig(**CONNECTOR_CONFIG))
    assert cls is SpecApproxConnector and not SpecApproxConnector.__abstractmethods__
    for name in ("get_num_new_matched_tokens", "update_state_after_alloc",
                 "build_connector_meta", "request_finished", "start_load_kv",
                 "get_block_ids_with_load_errors"):
        ours = tuple(inspect.signature(getattr(SpecApproxConnector, name)).parameters)
        theirs = tuple(inspect.signature(getattr(KVConnectorBase_V1, name)).parameters)
        assert ours[: len(theirs)] == theirs or "kwargs" in ours, name


def test_rerotation_matches_vllms_rope() -> None:
    """Kept keys are moved from position p to p - delta with vLLM's own rotary code; the
    self-check that guards it must pass for the standard rope and llama3 scaling."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from specapprox_vllm.kv_compact import _check_rerotation

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 512}
    for scaling, neox in ((None, True), (None, False), (llama3, True)):
        params = {"rope_theta": 10000.0, **({"rope_type": "default"} | (scaling or {}))}
        with set_current_vllm_config(VllmConfig()):
            rope = get_rope(64, max_position=4096, is_neox_style=neox,
                            rope_parameters=params, dtype=torch.float32)
        _check_rerotation(rope)

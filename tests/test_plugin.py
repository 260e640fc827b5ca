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

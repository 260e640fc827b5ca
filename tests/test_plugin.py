"""The vLLM plugin entry point, its version pin, and the KV connector vLLM loads.
(The patch points into vLLM internals are tested one by one in tests/test_vllm_compat.py.)"""

from __future__ import annotations

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


def test_kv_connector_implements_vllms_interface() -> None:
    """The SpecKV connector loads through vLLM's factory and leaves nothing abstract; the
    hooks it relies on keep their parameter lists."""
    import inspect

    from vllm.config.kv_transfer import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from specapprox_vllm.wire import CONNECTOR_CONFIG
    from specapprox_vllm.worker.kv_connector import SpecApproxConnector

    cls = KVConnectorFactory.get_connector_class(KVTransferConfig(**CONNECTOR_CONFIG))
    assert cls is SpecApproxConnector and not SpecApproxConnector.__abstractmethods__
    for name in ("get_num_new_matched_tokens", "update_state_after_alloc",
                 "build_connector_meta", "request_finished", "start_load_kv",
                 "get_block_ids_with_load_errors"):
        ours = tuple(inspect.signature(getattr(SpecApproxConnector, name)).parameters)
        theirs = tuple(inspect.signature(getattr(KVConnectorBase_V1, name)).parameters)
        assert ours[: len(theirs)] == theirs or "kwargs" in ours, name

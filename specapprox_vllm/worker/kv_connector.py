"""Out-of-tree vLLM KV connector that injects a compacted KV prefix into a decode request.

A SpecKV *decode request* is the prompt ``C`` placeholders + ``P[L-1]`` with
``kv_transfer_params = {"specapprox_load": key, "C": C}`` and a unique ``cache_salt`` (so it
never reads or publishes shared prefix blocks). At admission the scheduler side tells vLLM
that its first ``C`` tokens are already available (a synchronous external hit); vLLM
allocates blocks for ``C + 1`` tokens only, and the worker side writes each layer's stored
``[C, H_kv, D]`` rows (:mod:`.kv_compaction`) into those slots with the backend's
own ``do_kv_cache_update`` before the forward pass. Decoding then computes ``P[L-1]`` at
position ``C`` and continues like any request: the memory really held is that of ``C`` (+
generated) tokens.

Preemption: vLLM frees the request's blocks and later re-admits it with
``num_computed_tokens = 0``; the connector is asked again and reloads the same rows (they stay
stored until the request finishes), and vLLM recomputes the generated tokens on top of them.

What the scheduler side observed (blocks at admission, free blocks after allocation, loads)
comes back in the finished request's ``kv_transfer_params["specapprox"]``.

Its scheduler side also caps the prefix-cache hit of a request flagged for scores before its
first scoring row (``wire.prefix_cache_cap``). A separate draft engine runs the connector for
that alone: it never loads anything there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from specapprox_vllm import vllm_compat
from specapprox_vllm.wire import LOAD_KEY, REPORT_KEY, prefix_cache_cap
from specapprox_vllm.worker import kv_compaction

log = logging.getLogger("specapprox.kv_connector")


@dataclass
class SpecApproxMeta(KVConnectorMetadata):
    loads: dict[str, tuple[str, list[int], int]] = field(default_factory=dict)  # req -> key
    frees: list[str] = field(default_factory=list)


def _load_params(request: Any) -> dict[str, Any] | None:
    params = getattr(request, "kv_transfer_params", None) or {}
    return params if LOAD_KEY in params else None


def _scoring_hit_cap(request: Any) -> int | None:
    return prefix_cache_cap(getattr(getattr(request, "sampling_params", None), "extra_args",
                                    None))


class SpecApproxConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        self._pending: dict[str, tuple[str, list[int], int]] = {}
        self._frees: list[str] = []
        self._reports: dict[str, dict[str, Any]] = {}
        self._failed_blocks: set[int] = set()
        if role == KVConnectorRole.SCHEDULER:
            # Scoring requests read the prefix cache only up to their first scoring row.
            vllm_compat.cap_prefix_cache_hits(_scoring_hit_cap)

    # ---------------------------------------------------------- scheduler side (EngineCore)
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        params = _load_params(request)
        if params is None:
            return 0, False
        c = int(params["C"])
        if num_computed_tokens != 0 or c > request.num_tokens - 1:
            # Unique cache salts make local hits impossible; refuse rather than mix.
            log.error("specapprox load for %s refused (computed %d, C %d, tokens %d)",
                      request.request_id, num_computed_tokens, c, request.num_tokens)
            return 0, False
        return c, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int
                                 ) -> None:
        params = _load_params(request)
        if params is None or num_external_tokens <= 0:
            return
        block_ids = list(blocks.get_block_ids()[0])
        self._pending[request.request_id] = (params[LOAD_KEY], block_ids, num_external_tokens)
        report = self._reports.setdefault(request.request_id, {"loads": 0})
        report["loads"] += 1
        report["blocks_at_admission"] = len(block_ids)
        pool = vllm_compat.block_pool_stats(self)
        if pool is not None:
            report["free_blocks_after_admission"], report["num_blocks"] = pool

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = SpecApproxMeta(loads=self._pending, frees=self._frees)
        self._pending, self._frees = {}, []
        return meta

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict | None]:
        params = _load_params(request)
        if params is None:
            return False, None
        self._frees.append(params[LOAD_KEY])
        report = self._reports.pop(request.request_id, {"loads": 0})
        if block_ids and isinstance(block_ids[0], (list, tuple)):
            block_ids = block_ids[0]
        report["blocks_at_finish"] = len(block_ids or [])
        report["block_size"] = self._block_size
        return False, {REPORT_KEY: report}

    # ---------------------------------------------------------- worker side
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, SpecApproxMeta)
        kv_compaction.drop(meta.frees)
        layers = vllm_compat.attention_layers(forward_context)
        for req_id, (key, block_ids, c) in meta.loads.items():
            entry = kv_compaction.stored(key)
            j = torch.arange(c)
            slots = torch.tensor(block_ids, dtype=torch.long)[j // self._block_size]
            slots = slots * self._block_size + j % self._block_size
            if entry is None or entry.error or set(layers) - set(entry.kv):
                log.error("specapprox KV for %s (key %s) is missing", req_id, key)
                self._failed_blocks.update(block_ids)
                continue
            for name, layer in layers.items():
                k, v = entry.kv[name]
                if k.shape[0] != c:
                    raise RuntimeError(f"stored {k.shape[0]} rows for {name}, asked for {c}")
                vllm_compat.write_kv(layer, k, v, slots)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

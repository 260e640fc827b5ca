"""Worker extension (vLLM ``worker_extension_cls``): the methods the API process calls through
``AsyncLLM.collective_rpc`` (names in :class:`specapprox_vllm.wire.RPC`), the public channel
for bulk per-request results."""

from __future__ import annotations

from typing import Any

from specapprox_vllm.memory import trim_heap
from specapprox_vllm.worker import kv_compaction, prompt_scores


class SpecApproxWorkerExtension:
    def specapprox_pop_captures(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        return prompt_scores.pop_scores(keys)

    def specapprox_capture_count(self) -> int:
        return prompt_scores.count()

    def specapprox_kv_results(self, keys: list[str], with_indices: bool = False
                              ) -> dict[str, dict[str, Any]]:
        return kv_compaction.results(keys, with_indices)

    def specapprox_kv_drop(self, keys: list[str]) -> int:
        return kv_compaction.drop(keys)

    def specapprox_kv_store_info(self) -> dict[str, int]:
        return kv_compaction.store_info()

    def specapprox_kv_support(self) -> list[str]:
        return kv_compaction.support_problems(self.model_runner)

    def specapprox_trim_memory(self) -> dict[str, Any]:
        """Free heap pages back to the OS (see ``specapprox_vllm/memory.py``). Sent through
        ``collective_rpc``, so it runs between engine steps, never during a forward pass."""
        return trim_heap()

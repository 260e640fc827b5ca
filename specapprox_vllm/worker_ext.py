"""Worker extension (vLLM ``worker_extension_cls``): methods the API process calls through
``AsyncLLM.collective_rpc``, the public channel for bulk per-request results."""

from __future__ import annotations

from typing import Any


class SpecApproxWorkerExtension:
    def specapprox_pop_captures(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        from specapprox_vllm.capture import pop_captures

        return pop_captures(keys)

    def specapprox_capture_count(self) -> int:
        from specapprox_vllm.capture import CAPTURES

        return len(CAPTURES)

    def specapprox_kv_results(self, keys: list[str], with_indices: bool = False
                              ) -> dict[str, dict[str, Any]]:
        from specapprox_vllm.kv_compact import results

        return results(keys, with_indices)

    def specapprox_kv_drop(self, keys: list[str]) -> int:
        from specapprox_vllm.kv_compact import drop

        return drop(keys)

    def specapprox_kv_store_info(self) -> dict[str, int]:
        from specapprox_vllm.kv_compact import store_info

        return store_info()

    def specapprox_trim_memory(self) -> dict[str, Any]:
        """Free heap pages back to the OS (see ``specapprox_vllm/memory.py``). Sent through
        ``collective_rpc``, so it runs between engine steps, never during a forward pass."""
        from specapprox_vllm.memory import trim_heap

        return trim_heap()

"""Worker extension (vLLM ``worker_extension_cls``): methods the API process calls through
``AsyncLLM.collective_rpc``, the public channel for bulk per-request results."""

from __future__ import annotations

from typing import Any


class SpecApproxWorkerExtension:
    def specapprox_pop_captures(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        from specapprox_vllm.capture import pop_captures

        return pop_captures(keys)

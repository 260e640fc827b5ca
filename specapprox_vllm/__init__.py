"""specapprox-vllm: draft-based approximate inference (SpecPC, SpecKV) as a vLLM plugin.

vLLM loads :func:`register` from the ``vllm.general_plugins`` entry point in every process it
starts (API front end, engine core, workers, helper subprocesses), before any model exists.
It must therefore be idempotent, cheap, and must not import heavy vLLM modules; everything
that touches vLLM internals lives in :mod:`specapprox_vllm.vllm_compat`.
"""

from __future__ import annotations

__version__ = "0.3.0"

SUPPORTED_VLLM = "0.32"
_REGISTERED = False


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group.

    Fails loudly on a vLLM other than 0.32.x: the plugin relies on internals (attention
    backend impl signatures, scheduler request fields) that vLLM does not promise to keep.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from specapprox_vllm import vllm_compat

    vllm_compat.check_vllm_version()
    vllm_compat.install_hooks()
    _REGISTERED = True

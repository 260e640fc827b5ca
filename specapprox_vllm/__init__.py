"""specapprox-vllm: draft-based approximate inference (SpecPC, SpecKV) as a vLLM plugin.

vLLM loads :func:`register` from the ``vllm.general_plugins`` entry point in every process it
starts (API front end, engine core, workers, helper subprocesses), before any model exists.
It must therefore be idempotent, cheap, and must not import heavy vLLM modules; everything
that touches vLLM internals lives in :mod:`specapprox_vllm.vllm_compat`.

The package's folders say where their code runs: ``frontend/`` in the API process,
``worker/`` in vLLM's engine processes, ``policies/`` anywhere (pure maths, the method
registry), ``tools/`` in processes of their own (load tests, evaluation, benchmarks, model
preparation). ``wire.py`` is what the API process and the engines exchange.
"""

from __future__ import annotations

__version__ = "0.3.0"

_REGISTERED = False


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group.

    Fails loudly on a vLLM other than 0.32.x: the plugin relies on internals (attention
    backend impl signatures, scheduler request fields) that vLLM does not promise to keep.
    Loads the methods registered outside the package (``$SPECAPPROX_POLICY_MODULES``), so
    that every engine process knows the same methods as the API process.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from specapprox_vllm import vllm_compat
    from specapprox_vllm.policies import load_policy_modules

    vllm_compat.check_vllm_version()
    vllm_compat.install_hooks()
    load_policy_modules()
    _REGISTERED = True

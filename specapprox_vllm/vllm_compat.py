"""Every place where specapprox-vllm touches vLLM internals, in one module.

vLLM does not promise stability for the internals we rely on (attention-backend impl
signatures, scheduler request fields, the OpenAI app builders). This module pins the version
and names each patch point, and ``tests/test_vllm_compat.py`` checks that they still exist,
so an upgrade fails loudly instead of silently serving wrong results.
"""

from __future__ import annotations

SUPPORTED_VLLM_SERIES = "0.32."

# (module, attribute) pairs the product uses; checked by tests/test_vllm_compat.py.
PATCH_POINTS: tuple[tuple[str, str], ...] = (
    ("vllm.entrypoints.launchers.app", "build_app"),
    ("vllm.entrypoints.launchers.api_server.app_state", "init_app_state"),
    ("vllm.entrypoints.launchers.cli_args", "make_arg_parser"),
    ("vllm.entrypoints.launchers.cli_args", "validate_parsed_serve_args"),
    ("vllm.v1.engine.async_llm", "AsyncLLM"),
    ("vllm.engine.arg_utils", "AsyncEngineArgs"),
    ("vllm.engine.protocol", "EngineClient"),
)


class UnsupportedVLLMVersion(RuntimeError):
    pass


def vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def check_vllm_version(version: str | None = None) -> None:
    """Raise unless ``version`` (default: the installed vLLM) is 0.32.x."""
    version = version if version is not None else vllm_version()
    if not version.startswith(SUPPORTED_VLLM_SERIES):
        raise UnsupportedVLLMVersion(
            f"specapprox-vllm supports vLLM {SUPPORTED_VLLM_SERIES}x only, found {version}: "
            "its patch points (see specapprox_vllm/vllm_compat.py) are not verified there"
        )


def install_hooks() -> None:
    """Install the engine-side hooks (attention-backend override etc.).

    Called from :func:`specapprox_vllm.register` in every vLLM process; must stay idempotent
    and import-light. No hook is needed for ``none``; the approximation methods add theirs.
    """

"""Validated per-method settings of the request's ``approx`` object (API.md).

One pydantic v2 model per method, with the paper defaults of ALGORITHMS.md; the served
defaults come from ``configs/methods/<method>.yaml`` (:func:`load_method_defaults`) and a
request's keys override them (:func:`make_approx_config`). Unknown keys are rejected
(``extra="forbid"``) so a typo never silently falls back to a default, and every error names
the offending field.

Keys (API.md): ``method, kv_budget, prompt_budget, window, lookahead, kernel, neighbors,
start_layer, weighted_query, sink_tokens``. Additions:

* ``max_lookahead`` (speckv): cap on the draft length when ``lookahead`` is ``null`` (= the
  request's max_tokens).
* ``pc_window``, ``pc_kernel`` (speckv_pc): window and pool kernel of the SpecPC stage; the
  plain ``window`` and ``kernel`` belong to the SpecKV stage, as ``kv_budget`` does, while
  ``prompt_budget``, ``neighbors``, ``start_layer`` and ``weighted_query`` belong to SpecPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "CONFIG_CLASSES",
    "METHODS",
    "ApproxConfig",
    "NoneConfig",
    "SnapKVConfig",
    "SpecKVConfig",
    "SpecKVPCConfig",
    "SpecPCConfig",
    "StreamingLLMConfig",
    "load_method_defaults",
    "make_approx_config",
]

METHODS: tuple[str, ...] = ("none", "specpc", "speckv", "speckv_pc", "snapkv", "streamingllm")

_Pos = Field(gt=0)


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_budget(budget: int, budget_name: str, window: int, window_name: str) -> None:
    if budget < window:
        raise ValueError(
            f"{budget_name} ({budget}) must be >= {window_name} ({window}): "
            f"the last {window_name} tokens are always kept"
        )


class NoneConfig(_Base):
    """Full attention."""

    method: Literal["none"] = "none"


class SpecKVConfig(_Base):
    """SpecKV: draft-guided KV dropping (ALGORITHMS.md, SpecKV)."""

    method: Literal["speckv"] = "speckv"
    kv_budget: int = Field(256, gt=0, description="KV entries kept per layer per KV head (C)")
    window: int = Field(32, ge=0, description="recent prompt tokens always kept (W)")
    kernel: int = Field(7, ge=1, description="max-pool kernel over key scores")
    lookahead: int | None = Field(
        None, ge=0, description="draft tokens n; null = the request's max_tokens"
    )
    max_lookahead: int = Field(64, ge=0, description="cap on n when lookahead is null")

    @model_validator(mode="after")
    def _check(self) -> SpecKVConfig:
        _check_budget(self.kv_budget, "kv_budget", self.window, "window")
        return self

    def resolve_lookahead(self, max_tokens: int | None) -> int:
        """Draft length for a request: ``lookahead``, or ``min(max_tokens, max_lookahead)``."""
        if self.lookahead is not None:
            return self.lookahead
        if max_tokens is None:
            return self.max_lookahead
        return max(0, min(max_tokens, self.max_lookahead))


class SnapKVConfig(_Base):
    """SnapKV-style: SpecKV with ``n = 0`` (the prompt's own last ``W + 1`` queries score)."""

    method: Literal["snapkv"] = "snapkv"
    kv_budget: int = Field(256, gt=0)
    window: int = Field(32, ge=0)
    kernel: int = Field(7, ge=1)
    lookahead: Literal[0] = Field(0, description="always 0: SnapKV-style uses no draft")

    @model_validator(mode="after")
    def _check(self) -> SnapKVConfig:
        _check_budget(self.kv_budget, "kv_budget", self.window, "window")
        return self

    def resolve_lookahead(self, max_tokens: int | None) -> int:
        return 0


class StreamingLLMConfig(_Base):
    """StreamingLLM: ``sink_tokens`` first tokens plus the most recent ones."""

    method: Literal["streamingllm"] = "streamingllm"
    kv_budget: int = Field(256, gt=0)
    sink_tokens: int = Field(4, ge=0)

    @model_validator(mode="after")
    def _check(self) -> StreamingLLMConfig:
        _check_budget(self.kv_budget, "kv_budget", self.sink_tokens, "sink_tokens")
        return self


class SpecPCConfig(_Base):
    """SpecPC: draft-guided prompt compression (ALGORITHMS.md, SpecPC)."""

    method: Literal["specpc"] = "specpc"
    prompt_budget: int = Field(1024, gt=0, description="prompt tokens kept (C)")
    window: int = Field(64, ge=0, description="last prompt tokens kept and scoring (W)")
    lookahead: int = Field(1, ge=1, description="draft tokens n; the first n-1 also score")
    kernel: int = Field(32, ge=1, description="max-pool kernel K")
    neighbors: int = Field(32, ge=0, description="tokens kept around each selected token")
    start_layer: int = Field(8, ge=0, description="draft layers below are ignored")
    weighted_query: bool = True

    @model_validator(mode="after")
    def _check(self) -> SpecPCConfig:
        _check_budget(self.prompt_budget, "prompt_budget", self.window, "window")
        return self


class SpecKVPCConfig(_Base):
    """SpecKV-PC: SpecPC stage (``prompt_budget, pc_window, pc_kernel, neighbors,
    start_layer, weighted_query``) then SpecKV stage (``kv_budget, window, kernel``)."""

    method: Literal["speckv_pc"] = "speckv_pc"
    prompt_budget: int = Field(2048, gt=0)
    pc_window: int = Field(64, ge=0)
    pc_kernel: int = Field(32, ge=1)
    neighbors: int = Field(32, ge=0)
    start_layer: int = Field(8, ge=0)
    weighted_query: bool = True
    kv_budget: int = Field(256, gt=0)
    window: int = Field(32, ge=0)
    kernel: int = Field(7, ge=1)
    lookahead: int = Field(20, ge=1, description="draft tokens n, shared by both stages")

    @model_validator(mode="after")
    def _check(self) -> SpecKVPCConfig:
        _check_budget(self.prompt_budget, "prompt_budget", self.pc_window, "pc_window")
        _check_budget(self.kv_budget, "kv_budget", self.window, "window")
        return self

    def resolve_lookahead(self, max_tokens: int | None) -> int:
        return self.lookahead


ApproxConfig = (
    NoneConfig | SpecKVConfig | SnapKVConfig | StreamingLLMConfig | SpecPCConfig | SpecKVPCConfig
)

CONFIG_CLASSES: dict[str, type[_Base]] = {
    "none": NoneConfig,
    "speckv": SpecKVConfig,
    "snapkv": SnapKVConfig,
    "streamingllm": StreamingLLMConfig,
    "specpc": SpecPCConfig,
    "speckv_pc": SpecKVPCConfig,
}


def make_approx_config(
    method: str,
    overrides: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> ApproxConfig:
    """Validated settings of ``method``: class defaults < ``defaults`` (YAML) < ``overrides``.

    Raises:
        ValueError: unknown method, or an override's ``method`` contradicting ``method``
            (the message names ``method``).
        pydantic.ValidationError (a ``ValueError``): unknown key, wrong type or impossible
            setting; the message names the field.
    """
    if method not in CONFIG_CLASSES:
        raise ValueError(f"method: unknown approx method {method!r}; choose one of {METHODS}")
    merged: dict[str, Any] = {}
    for src in (defaults, overrides):
        if not src:
            continue
        given = src.get("method", method)
        if given != method:
            raise ValueError(f"method: {given!r} given where {method!r} was selected")
        merged.update({k: v for k, v in src.items() if k != "method"})
    return CONFIG_CLASSES[method](method=method, **merged)


def load_method_defaults(path_or_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Read per-method defaults from YAML: ``{method: {key: value}}``.

    ``path_or_dir`` is one ``<method>.yaml`` file, a directory of them (``configs/methods``),
    or a directory containing ``methods/`` (``configs``). Each file is validated through
    :func:`make_approx_config`, so a bad default fails at start-up, naming file and field.
    """
    path = Path(path_or_dir)
    if path.is_dir() and (path / "methods").is_dir():
        path = path / "methods"
    files = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no method YAML under {path}")
    out: dict[str, dict[str, Any]] = {}
    for f in files:
        data = yaml.safe_load(f.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{f}: expected a mapping, got {type(data).__name__}")
        method = data.get("method", f.stem)
        if method != f.stem and path.is_dir():
            raise ValueError(f"{f}: method {method!r} does not match the file name")
        try:
            make_approx_config(method, defaults=data)
        except ValueError as e:
            raise ValueError(f"{f}: {e}") from e
        out[method] = {k: v for k, v in data.items() if k != "method"}
    return out

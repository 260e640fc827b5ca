"""The one list of methods: policies register here by name, and everything else asks here.

* :func:`register_policy` (class decorator) adds a :class:`~.base.Policy` subclass;
  :func:`method_names`, :func:`get_policy`, :func:`build_policy` read the registry.
* :func:`make_approx_config` validates a request's ``approx`` keys over the served defaults;
  :func:`load_method_defaults` reads those defaults from ``configs/methods/<method>.yaml``.
* :func:`load_policy_modules` imports methods that live outside this package (a module name
  or a ``.py`` path, from ``$SPECAPPROX_POLICY_MODULES``). Every process that needs a
  policy calls it: the server at start-up, and ``specapprox_vllm.register()`` in each vLLM
  process, so the engine workers know the same methods as the API process.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .base import RATIO_KEYS, MethodConfig, Policy

__all__ = [
    "POLICIES",
    "POLICY_MODULES_ENV",
    "build_policy",
    "get_policy",
    "load_method_defaults",
    "load_policy_modules",
    "make_approx_config",
    "method_names",
    "register_policy",
]

POLICIES: dict[str, type[Policy]] = {}
POLICY_MODULES_ENV = "SPECAPPROX_POLICY_MODULES"
_LOADED: dict[str, str] = {}  # module spec -> module name


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make ``cls`` reachable as ``get_policy(cls.name)``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    method = cls.config_cls.model_fields.get("method")
    if cls.config_cls is MethodConfig or method is None or method.default != cls.name:
        raise ValueError(f"{cls.__qualname__}.config_cls must be a MethodConfig whose "
                         f"'method' defaults to {cls.name!r}")
    old = POLICIES.get(cls.name)
    if old is not None and old.__qualname__ != cls.__qualname__:
        raise ValueError(f"policy {cls.name!r} registered twice")
    POLICIES[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(POLICIES)


def get_policy(name: str) -> type[Policy]:
    """The policy class registered under ``name`` (``ValueError`` naming the choices if none)."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown approx method {name!r}; choose one of {', '.join(POLICIES)}"
        ) from None


def build_policy(cfg: MethodConfig) -> Policy:
    """The policy object for validated settings ``cfg`` (from :func:`make_approx_config`)."""
    return get_policy(cfg.method)(cfg)


def make_approx_config(
    method: str,
    overrides: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> MethodConfig:
    """Validated settings of ``method``: class defaults < ``defaults`` (YAML) < ``overrides``.

    A ratio (``kv_ratio``) replaces the absolute budget it stands for (``kv_budget``) of a
    lower source, and the other way round; both in one source is an error naming the ratio.

    Raises:
        ValueError: unknown method, or an override's ``method`` contradicting ``method``
            (the message names ``method``).
        pydantic.ValidationError (a ``ValueError``): unknown key, wrong type or impossible
            setting; the message names the field.
    """
    if method not in POLICIES:
        raise ValueError(f"method: unknown approx method {method!r}; choose one of "
                         f"{method_names()}")
    merged: dict[str, Any] = {}
    for src in (defaults, overrides):
        if not src:
            continue
        given = src.get("method", method)
        if given != method:
            raise ValueError(f"method: {given!r} given where {method!r} was selected")
        keys = {k: v for k, v in src.items() if k != "method"}
        for ratio, budget in RATIO_KEYS.items():
            # One stage, one budget: a ratio and an absolute budget from the same source
            # contradict each other; from different sources the later one replaces the other
            # (a request's kv_ratio overrides the served kv_budget, and the other way round).
            if keys.get(ratio) is not None and keys.get(budget) is not None:
                raise ValueError(f"{ratio}: give {ratio} or {budget}, not both")
            if keys.get(ratio) is not None:
                merged.pop(budget, None)
            elif keys.get(budget) is not None:
                merged.pop(ratio, None)
        merged.update(keys)
    return POLICIES[method].config_cls(method=method, **merged)


def load_method_defaults(path_or_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Read per-method defaults from YAML: ``{method: {key: value}}``.

    ``path_or_dir`` is one ``<method>.yaml`` file, a directory of them (``configs/methods``),
    or a directory containing ``methods/`` (``configs``). Each file is validated through
    :func:`make_approx_config`, so a bad default fails at start-up, naming file and field. A
    registered method without a file serves its class defaults.
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


def _import(spec: str) -> str:
    """Import one module given as a dotted name or a ``.py`` path; returns its name."""
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        if not path.is_file():
            raise ValueError(f"policy module {spec!r}: no such file")
        name = f"specapprox_policy_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return name
    importlib.import_module(spec)
    return spec


def load_policy_modules(specs: Iterable[str] | None = None) -> list[str]:
    """Import the modules that register methods from outside this package (idempotent).

    ``specs`` defaults to ``$SPECAPPROX_POLICY_MODULES`` (comma-separated module names or
    ``.py`` paths). Returns the names of the modules now loaded."""
    if specs is None:
        specs = [s for s in os.environ.get(POLICY_MODULES_ENV, "").split(",") if s.strip()]
    for spec in specs:
        spec = spec.strip()
        if spec not in _LOADED:
            _LOADED[spec] = _import(spec)
    return list(_LOADED.values())

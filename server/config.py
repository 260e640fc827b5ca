"""Server configuration: one YAML file, overridable key by key from CLI flags and environment.

Every leaf key of :class:`ServerConfig` has a dotted name (``target.max_model_len``) that
becomes a flag (``--target.max_model_len 4096``) and an environment variable
(``SPECAPPROX_TARGET__MAX_MODEL_LEN=4096``). Precedence: flag > environment > YAML > default.
Invalid values fail at start-up with a message that names the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from specapprox_vllm.policies import DEFAULT_METHOD, load_policy_modules, method_names

ENV_PREFIX = "SPECAPPROX_"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = "models/SmolLM2-135M-Instruct"


class ConfigError(ValueError):
    """A configuration problem, already phrased for the user (names the key)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineConfig(_Strict):
    """Arguments of one vLLM engine (target or draft). Names follow vLLM's EngineArgs."""

    model: str = DEFAULT_MODEL_DIR
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    max_model_len: int = Field(8192, ge=16)
    kv_cache_memory_gib: float = Field(
        1.0, gt=0, description="KV cache size of this engine (GiB); per engine, unlike "
        "VLLM_CPU_KVCACHE_SPACE which both engines would share")
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=16)
    block_size: int | None = Field(
        None, ge=16, description="KV block size in tokens (null: vLLM's default, 128 on "
        "CPU; CPU needs a multiple of 32). Smaller blocks let KV compaction free more")
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = True
    load_format: Literal["auto", "safetensors", "dummy"] = Field(
        "auto", description="'dummy': random weights of the model's config (speed benchmarks "
        "of shapes that have no checkpoint here; replies are noise)")
    seed: int = 0
    tensor_parallel_size: int = Field(1, ge=1)
    num_layers: int | None = Field(
        None, ge=1, description="Draft only: use the first k layers of `model` "
        "(a truncated copy is built once next to it)")


class DraftConfig(EngineConfig):
    enabled: bool = Field(True, description="serve the methods that use a draft (the server "
                          "offers only what it can run)")
    share_target_engine: bool = Field(
        True, description="when the draft is the target model itself, run it on the target "
        "engine: one copy of the weights and one KV pool, and SpecKV's lookahead is the "
        "answer's own first tokens (no second prefill); false starts a second engine anyway")
    kv_cache_memory_gib: float = Field(0.5, gt=0)

    def is_target(self, target: EngineConfig) -> bool:
        """Whether this draft is the target model itself (same weights, same numerics)."""
        return (self.num_layers is None and self.model == target.model
                and self.dtype == target.dtype and self.load_format == target.load_format)


class ServerSection(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    served_model_name: str = "SmolLM2-135M-Instruct"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_active_requests: int = Field(
        64, ge=1, description="completion requests served at once (draft + target work); "
        "more wait in the admission queue")
    max_queued_requests: int = Field(
        256, ge=0, description="requests waiting for a slot; beyond this the server answers "
        "429 with Retry-After instead of buffering without bound")
    request_timeout_s: float | None = Field(
        600.0, gt=0, description="wall-clock limit per request, queueing included (null: "
        "none); a request over it is aborted in both engines and answered 504")
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long in-flight requests may finish before "
        "they are cancelled and the engines stop")
    exit_on_engine_death: bool = Field(
        False, description="exit when an engine process dies (for orchestrators that "
        "restart on exit); otherwise stay up, /health answers 503 and requests fail fast")
    memory_trim_interval_s: float | None = Field(
        30.0, gt=0, description="every this many seconds, return the engine workers' freed "
        "heap memory to the OS (glibc malloc_trim; null: never). Without it a busy worker's "
        "RSS creeps up by megabytes per request")
    cors_allowed_origins: list[str] = Field(
        default_factory=list, description="origins allowed cross-origin browser access "
        "(empty: CORS off)")
    prompt_tokens_details: bool = Field(
        True, description="report usage.prompt_tokens_details.cached_tokens (the prompt "
        "tokens vLLM's prefix cache served; vLLM's --enable-prompt-tokens-details)")


def _module_spec(spec: str, base: Path = PROJECT_ROOT) -> str:
    """A policy module: a dotted name as is, a relative ``.py`` path from the project root."""
    if spec.endswith(".py") and not Path(spec).is_absolute():
        return str((base / spec).resolve())
    return spec


class ApproxSection(_Strict):
    policy_modules: list[str] = Field(
        default_factory=list, description="modules that register more methods, loaded in "
        "the server and every engine process: dotted names or .py paths")
    default_method: str = DEFAULT_METHOD
    methods_dir: str = "configs/methods"
    on_draft_failure: Literal["fallback", "error"] = Field(
        "fallback", description="when the draft engine fails or times out: serve the request "
        "with full attention (usage.approx says so) or answer 503")
    draft_timeout_s: float | None = Field(
        120.0, gt=0, description="limit on one request's draft stage (null: none)")

    @field_validator("default_method")
    @classmethod
    def _known(cls, v: str, info: ValidationInfo) -> str:
        # Methods of policy_modules count too: load them first (idempotent).
        load_policy_modules([_module_spec(m) for m in info.data.get("policy_modules", [])])
        if v not in method_names():
            raise ValueError(f"unknown method {v!r}; expected one of "
                             f"{', '.join(method_names())}")
        return v


class ServerConfig(_Strict):
    server: ServerSection = ServerSection()
    target: EngineConfig = EngineConfig()
    draft: DraftConfig = DraftConfig()
    approx: ApproxSection = ApproxSection()

    def resolve_paths(self, base: Path) -> ServerConfig:
        """Relative model and config paths are relative to the project root (``base``), so
        the server can be started from any directory."""
        for eng in (self.target, self.draft):
            p = Path(eng.model)
            if not p.is_absolute() and (base / p).exists():
                eng.model = str((base / p).resolve())
        p = Path(self.approx.methods_dir)
        if not p.is_absolute():
            self.approx.methods_dir = str((base / p).resolve())
        self.approx.policy_modules = [_module_spec(m, base) for m in self.approx.policy_modules]
        return self


def leaf_keys(model: type[BaseModel] = ServerConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf key -> pydantic FieldInfo, for building flags and env names."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(leaf_keys(ann, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = field
    return out


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper().replace(".", "__")


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {p!r} must be a mapping")
        tree = node
    tree[last] = value


def _parse_scalar(raw: str) -> Any:
    """Flags and env values are strings; YAML scalars give ints, floats, bools, null."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        lines.append(f"config key '{key}': {e['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> ServerConfig:
    """YAML file, then environment, then explicit overrides (dotted keys)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must contain a mapping at the top level")
    environ = os.environ if environ is None else environ
    keys = leaf_keys()
    for key in keys:
        if env_name(key) in environ:
            _set(tree, key, _parse_scalar(environ[env_name(key)]))
    for key, value in (overrides or {}).items():
        if key not in keys:
            raise ConfigError(f"unknown config key {key!r}")
        _set(tree, key, value)
    try:
        cfg = ServerConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None
    return cfg.resolve_paths(PROJECT_ROOT)

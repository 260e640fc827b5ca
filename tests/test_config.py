"""Configuration: YAML defaults, flag and environment overrides, errors that name the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.cli import parse_config
from server.config import ConfigError, env_name, leaf_keys, load_config
from tests.conftest import ROOT

DEFAULT = ROOT / "configs" / "default.yaml"


def test_default_yaml_matches_api_contract() -> None:
    cfg = load_config(DEFAULT, environ={})
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8000)
    assert cfg.target.model.endswith("models/SmolLM2-135M-Instruct")
    assert cfg.draft.model.endswith("models/SmolLM2-135M-Instruct")
    assert cfg.approx.default_method == "none"


def test_every_key_has_flag_and_env() -> None:
    keys = leaf_keys()
    assert {"target.dtype", "draft.num_layers", "server.port", "approx.default_method"} <= set(keys)
    assert env_name("target.max_model_len") == "SPECAPPROX_TARGET__MAX_MODEL_LEN"


def test_precedence_flag_over_env_over_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECAPPROX_TARGET__MAX_MODEL_LEN", "4096")
    monkeypatch.setenv("SPECAPPROX_SERVER__PORT", "9001")
    cfg = parse_config(["--config", str(DEFAULT), "--port", "9002"])
    assert cfg.target.max_model_len == 4096
    assert cfg.server.port == 9002
    cfg = parse_config(["--config", str(DEFAULT), "--target.enable_prefix_caching", "false",
                        "--api-key", "12345"])
    assert cfg.target.enable_prefix_caching is False
    assert cfg.server.api_key == "12345"  # kept a string, not parsed as a number


@pytest.mark.parametrize(("overrides", "key"), [
    ({"target.max_model_len": 3}, "target.max_model_len"),
    ({"target.dtype": "float8"}, "target.dtype"),
    ({"approx.default_method": "magic"}, "approx.default_method"),
    ({"server.port": 70000}, "server.port"),
])
def test_invalid_values_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DEFAULT, overrides, environ={})


def test_unknown_keys_and_files_are_rejected(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown config key 'target.nope'"):
        load_config(DEFAULT, {"target.nope": 1}, environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("target:\n  modle: x\n")
    with pytest.raises(ConfigError, match="target.modle"):
        load_config(bad, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_cli_exits_with_message_naming_the_key() -> None:
    r = subprocess.run([sys.executable, "-m", "server.cli", "--target.max_model_len", "3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert "target.max_model_len" in r.stderr

"""The embedded-model preparation: found in the installed package, verified, idempotent."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from specapprox_vllm.tools import prepare_model as pm


def test_gguf_is_found_in_the_installed_package() -> None:
    path = pm.find_gguf()
    assert path.name == pm.GGUF_NAME and path.stat().st_size > 50_000_000


def test_prepared_folder_is_complete_and_verified(smollm2_dir: Path) -> None:
    assert pm.is_prepared(smollm2_dir)
    info = json.loads((smollm2_dir / pm.MARKER).read_text())
    assert "Paris" in info["check_answer"]
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in cfg  # the GGUF quantizer was dropped
    assert (smollm2_dir / "chat_template.jinja").is_file() or \
        "chat_template" in (smollm2_dir / "tokenizer_config.json").read_text()


def test_second_run_is_a_noop(smollm2_dir: Path, capsys: pytest.CaptureFixture) -> None:
    before = (smollm2_dir / "model.safetensors").stat().st_mtime
    t0 = time.time()
    pm.prepare(smollm2_dir)
    assert time.time() - t0 < 5
    assert "nothing to do" in capsys.readouterr().out
    assert (smollm2_dir / "model.safetensors").stat().st_mtime == before


def test_incomplete_or_unverified_folders_are_not_prepared(smollm2_dir: Path,
                                                            tmp_path: Path) -> None:
    copy = tmp_path / "m"
    copy.mkdir()
    for f in [*pm.REQUIRED_FILES, pm.MARKER]:
        (copy / f).symlink_to(smollm2_dir / f)
    assert pm.is_prepared(copy)
    (copy / pm.MARKER).unlink()
    marker = json.loads((smollm2_dir / pm.MARKER).read_text())
    (copy / pm.MARKER).write_text(json.dumps({**marker, "weights_bytes": 1}))
    assert not pm.is_prepared(copy)  # weights changed since verification
    (copy / pm.MARKER).write_text(json.dumps({**marker, "verified": False}))
    assert not pm.is_prepared(copy)
    shutil.rmtree(copy)
    assert not pm.is_prepared(copy)

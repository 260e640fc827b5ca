"""The k-layer draft checkpoint: same weights as the target's first k layers, loadable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specapprox_vllm.tools.truncate import truncated_checkpoint
from tests.conftest import make_tiny_llama


def test_first_k_layers_match_the_source(tmp_path: Path, smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = make_tiny_llama(tmp_path / "src", smollm2_dir, layers=4)
    out = truncated_checkpoint(src, 2)
    assert out == tmp_path / "src-first2"
    full = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    part = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert part.config.num_hidden_layers == 2
    fs, ps = full.state_dict(), part.state_dict()
    assert set(ps) == {k for k in fs if not any(f"layers.{i}." in k for i in (2, 3))}
    assert all(torch.equal(ps[k], fs[k]) for k in ps)
    # Reused while the source is unchanged; rebuilt for another k.
    mtime = (out / "model.safetensors").stat().st_mtime
    assert truncated_checkpoint(src, 2) == out
    assert (out / "model.safetensors").stat().st_mtime == mtime
    with pytest.raises(ValueError, match="draft.num_layers"):
        truncated_checkpoint(src, 5)


def test_server_uses_it_for_draft_num_layers(tmp_path: Path, smollm2_dir: Path) -> None:
    from server.config import load_config
    from server.engines import draft_engine_args
    from tests.conftest import ROOT

    src = make_tiny_llama(tmp_path / "t", smollm2_dir, layers=3)
    cfg = load_config(ROOT / "configs" / "default.yaml",
                      {"draft.model": str(src), "draft.num_layers": 2}, environ={})
    args = draft_engine_args(cfg)
    assert Path(args.model) == tmp_path / "t-first2"


def test_separate_draft_engine_has_the_kv_connector(smollm2_dir: Path) -> None:
    """Its scheduler side caps a scoring draft request's prefix-cache hit (see
    tests/test_specpc_vllm.py): without it a repeated prompt is drafted twice."""
    from server.config import load_config
    from server.engines import draft_engine_args, needs_draft
    from specapprox_vllm.wire import CONNECTOR_CONFIG
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "default.yaml", {"draft.share_target_engine": False},
                      environ={})
    assert needs_draft(cfg)
    args = draft_engine_args(cfg)
    assert args.kv_transfer_config.kv_connector == CONNECTOR_CONFIG["kv_connector"]

"""Start-up refusal of a draft whose tokenizer differs from the target's (issue 19): compared by
vocabulary (token -> id, special tokens), not by file names, before any engine starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import ConfigError, load_config
from server.model_checks import check_draft_tokenizer, vocabulary_differences
from tests.conftest import ROOT

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "config.json", "generation_config.json")


def copy_tokenizer(src: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


def swapped_ids(src: Path, out: Path, a: int = 1000, b: int = 1001) -> Path:
    """SmolLM2's tokenizer with the ids of two ordinary tokens exchanged: the same files,
    the same size, one vocabulary apart."""
    copy_tokenizer(src, out)
    data = json.loads((out / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    vocab[by_id[a]], vocab[by_id[b]] = b, a
    (out / "tokenizer.json").write_text(json.dumps(data))
    return out


def tok(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_tokenizer_mismatch_found_by_vocabulary(tmp_path, smollm2_dir) -> None:
    base = tok(smollm2_dir)
    same = copy_tokenizer(smollm2_dir, tmp_path / "same")
    assert vocabulary_differences(base, tok(same)) == []
    diff = vocabulary_differences(base, tok(swapped_ids(smollm2_dir, tmp_path / "swapped")))
    assert len(diff) == 1 and diff[0].startswith("2 tokens have another id"), diff
    assert ": 1000 vs 1001" in diff[0], diff


def test_tokenizer_mismatch_of_another_family(tmp_path, smollm2_dir) -> None:
    """A tokenizer trained elsewhere (a tiny BPE): sizes, ids and special tokens differ."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    other = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="</s>")
    diff = vocabulary_differences(tok(smollm2_dir), other)
    text = "; ".join(diff)
    assert "tokens in the target's vocabulary" in text and "eos_token" in text, diff


def test_tokenizer_mismatch_refused_by_the_config_check(tmp_path, smollm2_dir) -> None:
    draft = swapped_ids(smollm2_dir, tmp_path / "draft")
    cfg = load_config(ROOT / "configs/default.yaml", {"draft.model": str(draft)}, environ={})
    with pytest.raises(ConfigError) as e:
        check_draft_tokenizer(cfg)
    msg = str(e.value)
    assert str(draft) in msg and str(smollm2_dir) in msg and "another id" in msg, msg
    # the shipped two-model shape: a dummy target with SmolLM2's tokenizer, SmolLM2 drafting
    large = load_config(ROOT / "configs/large-target.yaml", environ={})
    assert large.draft.model != large.target.model
    check_draft_tokenizer(large)
    # self-draft: one model, nothing to compare
    check_draft_tokenizer(load_config(ROOT / "configs/default.yaml", environ={}))


@pytest.mark.timeout(300)
def test_tokenizer_mismatch_stops_the_server_before_its_engines(tmp_path, smollm2_dir) -> None:
    draft = swapped_ids(smollm2_dir, tmp_path / "draft")
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "--draft.model", str(draft), "--port", "0"],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "does not share the target's tokenizer" in proc.stderr, proc.stderr[-2000:]
    assert str(draft) in proc.stderr, proc.stderr[-2000:]
    assert "starting target engine" not in proc.stderr, proc.stderr[-2000:]

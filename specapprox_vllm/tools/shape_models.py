"""Checkpoint folders for models that exist here only as a shape: speed benchmarks.

vLLM's ``load_format: dummy`` serves random weights of any config, so a folder with a
``config.json`` and SmolLM2's tokenizer is enough to measure what a larger target or a longer
context costs on this machine. Their replies are noise; never read accuracy from them.

* ``large-target``: the paper's shape (a draft much cheaper than the target), about 8x
  SmolLM2-135M's FLOPs per token: a Llama with hidden 1536, 28 layers, MLP 5120, 12 query and
  4 KV heads (0.84B non-embedding parameters against SmolLM2's 0.107B); used by
  ``configs/large-target.yaml`` with the real SmolLM2 as its draft.
* ``smollm2-32k``: SmolLM2's own shape with a 32k-token context (cost curves past 8k).

``specapprox-prepare-model`` writes them next to the embedded model (no weights, a few
kilobytes each).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

SKIP = ("config.json", "model.safetensors.index.json")
SHAPES: dict[str, dict[str, Any]] = {
    "large-target": {"hidden_size": 1536, "num_hidden_layers": 28, "intermediate_size": 5120,
                     "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 128,
                     "max_position_embeddings": 8192, "tie_word_embeddings": False},
    "smollm2-32k": {"max_position_embeddings": 32768},
}
MARKER = "specapprox_shape.json"


def shape_folder(base: Path, shape: str, out: Path | None = None) -> Path:
    """``models/dummy-<shape>`` (beside ``base``): ``base``'s config with ``SHAPES[shape]``
    over it and ``base``'s tokenizer, for ``load_format: dummy`` (rewritten only when the
    shape changed)."""
    out = out or base.with_name(f"dummy-{shape}")
    config = json.loads((base / "config.json").read_text())
    config.update(SHAPES[shape])
    config.pop("rope_scaling", None)
    stamp = {"base": base.name, "shape": shape, "config": config,
             "files": sorted(f.name for f in base.iterdir() if f.name not in SKIP)}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in base.iterdir():  # tokenizer, chat template, generation config: not the weights
        if f.is_file() and f.name not in SKIP and f.suffix != ".safetensors" \
                and not f.name.startswith("specapprox_"):
            shutil.copyfile(f, out / f.name)
    marker.write_text(json.dumps(stamp))
    return out


def non_embedding_params(config: dict[str, Any]) -> int:
    """Parameters of the attention and MLP blocks (what a token's FLOPs scale with)."""
    h, layers, mlp = (config["hidden_size"], config["num_hidden_layers"],
                      config["intermediate_size"])
    d = config.get("head_dim") or h // config["num_attention_heads"]
    q = config["num_attention_heads"] * d
    kv = config["num_key_value_heads"] * d
    return layers * (h * q + 2 * h * kv + q * h + 3 * h * mlp)

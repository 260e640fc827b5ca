"""A draft made of the target's own first k layers, as a checkpoint folder vLLM can load.

Why not only ``hf_overrides={"num_hidden_layers": k}``: vLLM 0.32's Llama weight loader
fails on the checkpoint's extra layers ("There is no module or parameter named
'layers.12'"). So the draft gets its own folder holding the embeddings, the first k layers,
the final norm and the head, with ``num_hidden_layers = k`` in its config; tokenizer files are
linked. It is built once next to the source and reused while the source weights are unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

MARKER = "specapprox_truncated.json"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _source_stamp(src: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(src.glob("*.safetensors"))}


def truncated_checkpoint(src: str | Path, layers: int, out: str | Path | None = None) -> Path:
    """Folder with the first ``layers`` layers of the HF checkpoint ``src`` (built if needed)."""
    from safetensors.torch import load_file, save_file

    src = Path(src)
    config = json.loads((src / "config.json").read_text())
    total = int(config["num_hidden_layers"])
    if not 1 <= layers <= total:
        raise ValueError(f"draft.num_layers: {layers} must be in 1..{total} for {src}")
    out = Path(out) if out is not None else src.with_name(f"{src.name}-first{layers}")
    stamp = {"source": str(src.resolve()), "layers": layers, "weights": _source_stamp(src)}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        for name, t in load_file(f).items():
            m = _LAYER.search(name)
            if m is None or int(m.group(1)) < layers:
                tensors[name] = t
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    config["num_hidden_layers"] = layers
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    skip = ("config.json", "model.safetensors.index.json")
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in skip \
                and not f.name.startswith("specapprox_"):
            os.symlink(f.resolve(), tmp / f.name)
    (tmp / MARKER).write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out

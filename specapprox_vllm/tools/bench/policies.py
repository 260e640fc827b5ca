"""Time the selection policies against one target prefill of the same prompt length (CPU).

Shapes are SmolLM2-135M's (30 layers, 9 query heads, 3 KV heads, head dim 64). For every
prompt length L the policies run on random post-RoPE tensors exactly as the serving code calls
them, once per layer:

* speckv:       ``speckv_select_qk`` with W + n + 1 = 32 + 64 + 1 queries, 30 layers;
* snapkv:       the same with n = 0 (33 queries);
* streamingllm: ``streamingllm_select`` (no scores);
* specpc:       prefill record of W = 64 rows in draft layers 8..29, aggregation, selection
                (C = 1024, K = N = 32);
* speckv_pc:    SpecPC stage with n = 20 (prefill record + 19 one-row decode records,
                C = 2048) then SpecKV on the 2048-token compressed prompt (53 queries).

The prefill is a forward of an HF Llama with SmolLM2's config (random weights: the cost does
not depend on them), SDPA attention, float32, ``logits_to_keep=1``. Lengths up to
``--max-measured`` are measured; longer ones are extrapolated from the two longest measured
ones with ``t(L) = a L + b L^2`` (linear layers + attention), and marked so.

Usage: python -m specapprox_vllm.tools.bench.policies [--lengths 4096 16384 65536]
[--out docs/results/...] (or ``python scripts/bench_policies.py ...`` from a checkout)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from specapprox_vllm.policies import (
    SnapKVPolicy,
    SpecKVPCPolicy,
    SpecKVPolicy,
    SpecPCPolicy,
    StreamingLLMPolicy,
    speckv_select_qk,
    specpc_record,
    specpc_select,
    specpc_token_scores,
    streamingllm_select,
)

REPO = Path(__file__).resolve().parents[3]  # specapprox_vllm/tools/bench/ -> checkout
LAYERS, H_Q, H_KV, D = 30, 9, 3, 64


def _timeit(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time in ms (one warm-up run first)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _speckv(length: int, n: int, window: int = 32, budget: int = 256) -> Callable[[], object]:
    g = torch.Generator().manual_seed(0)
    qs = torch.randn(LAYERS, window + n + 1, H_Q, D, generator=g)
    k = torch.randn(length + n, H_KV, D, generator=g)  # one key tensor reused for all layers

    def run() -> None:
        for layer in range(LAYERS):
            speckv_select_qk(qs[layer], k, length, budget, window, 7)

    return run


def _specpc_scores(length: int, n: int, window: int, start: int = 8) -> Callable[[], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    q_pre = torch.randn(window, H_Q, D, generator=g)
    q_dec = torch.randn(max(n - 1, 0), 1, H_Q, D, generator=g)
    k = torch.randn(length + n, H_KV, D, generator=g)

    def run() -> torch.Tensor:
        prefill = [specpc_record(q_pre, k[:length], window, True) for _ in range(start, LAYERS)]
        records = [[None] * start + prefill]
        for t in range(1, n):  # decode step t: query at position L+t-1 sees L+t keys
            keys = k[: length + t]
            step = [specpc_record(q_dec[t - 1], keys, 0, True) for _ in range(start, LAYERS)]
            records.append([None] * start + step)
        return specpc_token_scores(records, length, start)

    return run


def policy_timers(length: int) -> dict[str, Callable[[], object]]:
    speckv, snapkv = _speckv(length, 64), _speckv(length, 0)
    pc_scores = _specpc_scores(length, 1, 64)
    casc_scores = _specpc_scores(length, 20, 64)
    casc_kv = _speckv(min(length, 2048), 20) if length > 2048 else None

    def specpc() -> None:
        specpc_select(pc_scores(), 1024, 64, 32, 32)

    def cascade() -> None:
        specpc_select(casc_scores(), 2048, 64, 32, 32)
        if casc_kv is not None:
            casc_kv()

    return {
        SpecKVPolicy.name: speckv,
        SnapKVPolicy.name: snapkv,
        StreamingLLMPolicy.name: lambda: [streamingllm_select(length, 256, 4)
                                          for _ in range(LAYERS)],
        SpecPCPolicy.name: specpc,
        SpecKVPCPolicy.name: cascade,
    }


def _model_config() -> object:
    from transformers import LlamaConfig

    folder = REPO / "models" / "SmolLM2-135M-Instruct" / "config.json"
    if folder.is_file():
        cfg = LlamaConfig.from_json_file(folder)
    else:  # same shapes, written out
        cfg = LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        )
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, 1 << 17)
    return cfg


@torch.no_grad()
def prefill_ms(length: int) -> float:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_model_config()).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 49152, (1, length))
    t = time.perf_counter()
    model(input_ids=ids, logits_to_keep=1, use_cache=False)
    return (time.perf_counter() - t) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--max-measured", type=int, default=16384, help="longest measured prefill")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "bench_policies.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)

    rows, prefill = [], {}
    for length in args.lengths:
        if length <= args.max_measured:
            prefill[length] = (prefill_ms(length), True)
            print(f"prefill L={length}: {prefill[length][0]:.0f} ms", flush=True)
    measured = sorted(prefill)
    for length in args.lengths:
        if length in prefill:
            continue
        if len(measured) < 2:
            raise SystemExit("need two measured prefill lengths to extrapolate")
        (l1, (t1, _)), (l2, (t2, _)) = [(x, prefill[x]) for x in measured[-2:]]
        b = (t2 / l2 - t1 / l1) / (l2 - l1)  # t/L = a + b L
        a = t1 / l1 - b * l1
        prefill[length] = (a * length + b * length * length, False)
    for length in args.lengths:
        for method, fn in policy_timers(length).items():
            reps = args.repeats if length <= 16384 else 1
            ms = _timeit(fn, reps)
            pre, was_measured = prefill[length]
            rows.append(
                {
                    "prompt_len": length,
                    "method": method,
                    "select_ms": round(ms, 2),
                    "prefill_ms": round(pre, 1),
                    "prefill_measured": was_measured,
                    "ratio": round(ms / pre, 5),
                }
            )
            print(
                f"L={length:6d} {method:13s} select {ms:9.1f} ms  ratio {ms / pre:.4f}", flush=True
            )
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
        "shapes": {"layers": LAYERS, "q_heads": H_Q, "kv_heads": H_KV, "head_dim": D},
        "prefill": "HF Llama with SmolLM2 config, random weights, SDPA, fp32, batch 1",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

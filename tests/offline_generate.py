"""Greedy generation with vLLM's offline ``LLM`` (the independent reference for the server).

Run as a script (engines spawn processes, so it needs a ``__main__`` guard):
``python tests/offline_generate.py MODEL OUT.json PROMPT [PROMPT ...]``; one prompt per
``generate`` call so that batching cannot change the numerics.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    model, out, prompts = sys.argv[1], sys.argv[2], sys.argv[3:]
    llm = LLM(model=model, dtype="float32", max_model_len=8192, enforce_eager=True,
              kv_cache_memory_bytes=1 << 30, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    results = []
    for p in prompts:
        (res,) = llm.generate([p], params, use_tqdm=False)
        results.append({"prompt": p, "text": res.outputs[0].text,
                        "token_ids": list(res.outputs[0].token_ids)})
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()

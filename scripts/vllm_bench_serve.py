"""``vllm bench serve`` without vLLM's CLI.

Thin entry point, kept so that recorded commands (``python scripts/vllm_bench_serve.py ...``) still
work. The code is :mod:`specapprox_vllm.tools.bench.vllm_bench_serve`; the same program::

    python -m specapprox_vllm.tools.bench.vllm_bench_serve --help
"""

from specapprox_vllm.tools.bench.vllm_bench_serve import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Target prefill time: no compression vs SpecPC.

Thin entry point, kept so that recorded commands (``python scripts/bench_prefill.py ...``) still
work. The code is :mod:`specapprox_vllm.tools.bench.prefill`; the same program::

    python -m specapprox_vllm.tools.bench.prefill --help
"""

from specapprox_vllm.tools.bench.prefill import main

if __name__ == "__main__":
    raise SystemExit(main())

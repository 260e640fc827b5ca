"""How each method's cost grows with the prompt length.

Thin entry point, kept so that recorded commands (``python scripts/bench_scaling.py ...``) still
work. The code is :mod:`specapprox_vllm.tools.bench.scaling`; the same program::

    python -m specapprox_vllm.tools.bench.scaling --help
"""

from specapprox_vllm.tools.bench.scaling import main

if __name__ == "__main__":
    raise SystemExit(main())

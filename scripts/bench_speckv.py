"""The approximate methods against full KV under load (issues 5 and 6).

Thin entry point, kept so that recorded commands (``python scripts/bench_speckv.py ...``) still
work. The code is :mod:`specapprox_vllm.tools.bench.speckv`; the same program::

    python -m specapprox_vllm.tools.bench.speckv --help
"""

from specapprox_vllm.tools.bench.speckv import main

if __name__ == "__main__":
    raise SystemExit(main())

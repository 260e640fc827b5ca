"""Selection cost of each policy against one target prefill (CPU, no server).

Thin entry point, kept so that recorded commands (``python scripts/bench_policies.py ...``) still
work. The code is :mod:`specapprox_vllm.tools.bench.policies`; the same program::

    python -m specapprox_vllm.tools.bench.policies --help
"""

from specapprox_vllm.tools.bench.policies import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Multi-turn (SCBench-style) accuracy and latency of every method against full attention.

Thin entry point, like ``scripts/eval_accuracy.py``, so the command reads the same as the other
evaluations'. The code is :mod:`specapprox_vllm.tools.eval.multiturn`; the same program::

    python -m specapprox_vllm.tools.eval.multiturn --help
"""

from specapprox_vllm.tools.eval.multiturn import main

if __name__ == "__main__":
    raise SystemExit(main())

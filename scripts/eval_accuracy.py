"""Accuracy of every method against full attention on RULER-style tasks.

Thin entry point, kept so that recorded commands (``python scripts/eval_accuracy.py ...``) still
work. The code is :mod:`specapprox_vllm.tools.eval.accuracy`; the same program::

    python -m specapprox_vllm.tools.eval.accuracy --help
"""

from specapprox_vllm.tools.eval.accuracy import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Long replies decoded from a compressed KV: fidelity of every method to full attention's reply.

Thin entry point, like ``scripts/eval_accuracy.py``. The code is
:mod:`specapprox_vllm.tools.eval.long_answer`; the same program::

    python -m specapprox_vllm.tools.eval.long_answer --help
"""

from specapprox_vllm.tools.eval.long_answer import main

if __name__ == "__main__":
    raise SystemExit(main())

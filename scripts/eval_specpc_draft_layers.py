"""SpecPC needle accuracy as a function of the draft's depth.

Thin entry point, kept so that recorded commands
(``python scripts/eval_specpc_draft_layers.py ...``) still work. The code is
:mod:`specapprox_vllm.tools.eval.specpc_draft_layers`; the same program::

    python -m specapprox_vllm.tools.eval.specpc_draft_layers --help
"""

from specapprox_vllm.tools.eval.specpc_draft_layers import main

if __name__ == "__main__":
    raise SystemExit(main())

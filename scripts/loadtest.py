"""The load tester (also the ``specapprox-loadtest`` console script).

Thin entry point, kept so that recorded commands (``python scripts/loadtest.py ...``) still
work. The code is :mod:`specapprox_vllm.tools.loadtest.cli`; the same program::

    python -m specapprox_vllm.tools.loadtest.cli --help
"""

from specapprox_vllm.tools.loadtest.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

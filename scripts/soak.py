"""The soak test (also the ``specapprox-soak`` console script).

Thin entry point, kept so that recorded commands (``python scripts/soak.py ...``) still
work. The code is :mod:`specapprox_vllm.tools.loadtest.soak`; the same program::

    python -m specapprox_vllm.tools.loadtest.soak --help
"""

from specapprox_vllm.tools.loadtest.soak import main

if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Run the load tester from a checkout: ``python scripts/loadtest.py --help``.

Same program as the ``specapprox-loadtest`` console script (specapprox_vllm/loadtest/cli.py);
this wrapper only puts the repository root on ``sys.path`` so it works without installing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specapprox_vllm.loadtest.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

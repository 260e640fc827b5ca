"""Load testing for OpenAI-compatible servers (``specapprox-loadtest``).

Lives in the installed package, not only under ``scripts/``, so that the console script works
from a plain ``pip install`` (the docker-compose ``loadtest`` service runs it that way).
Modules: ``stats`` (definitions of TTFT/TPOT/ITL/E2E, percentiles, goodput), ``prompts``
(synthetic exact-length prompts, JSONL datasets), ``client`` (requests, SSE, arrivals),
``report`` (printed block, JSONL/JSON, charts), ``cli`` (arguments and the run).
"""

from __future__ import annotations

"""Load testing for OpenAI-compatible servers (``specapprox-loadtest``).

Lives in the installed package (``specapprox_vllm.tools``), so that the console script works
from a plain ``pip install`` (the docker-compose ``loadtest`` service runs it that way).
Modules: ``stats`` (definitions of TTFT/TPOT/ITL/E2E, percentiles, goodput), ``prompts``
(synthetic exact-length prompts, JSONL datasets), ``client`` (requests, SSE, arrivals),
``report`` (printed block, JSONL/JSON, charts), ``cli`` (arguments and the run); and the soak
(``soak``: the workload and the state reads, ``soak_checks``: its bookkeeping and invariants).
"""

from __future__ import annotations

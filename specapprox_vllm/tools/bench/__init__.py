"""Benchmarks, run as ``python -m specapprox_vllm.tools.bench.<name>`` (or
``python scripts/bench_<name>.py``): ``speckv`` (the methods against full KV under load),
``prefill`` (SpecPC's prefill time), ``scaling`` (costs against prompt length), ``policies``
(selection cost against one prefill, no server), ``vllm_bench_serve`` (``vllm bench serve``).
"""

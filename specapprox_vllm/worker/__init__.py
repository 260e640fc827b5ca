"""Code that runs inside vLLM's engine processes, never in the API process.

* ``hooks``: the two callbacks vLLM calls through :mod:`specapprox_vllm.vllm_compat` (once
  per model step, and after each layer's attention), dispatching to
* ``prompt_scores`` (draft engine: a request's prompt scores, for SpecPC) and
  ``kv_compaction`` (target engine: scoring, selection, gathering and re-rotation of the kept
  KV entries, stored per request);
* ``kv_connector``: loads stored entries into a decode request (its scheduler half runs in
  the EngineCore process, its worker half in the workers);
* ``extension``: the methods the API process calls with ``collective_rpc``;
* ``cpu_backend``: the import path vLLM's attention registry resolves.

What a method does is asked of its policy (rebuilt from the registry from the
:class:`~specapprox_vllm.wire.ScoringSpec` each flagged request carries); this package only
applies it to vLLM's batches and paged cache.
"""

"""The API-process side of the plugin: what happens between "request accepted" and "target
engine generates".

* ``scheduler``: the draft-model scheduler, one :class:`~.scheduler.Plan` per request, and the
  server's draft-failure policy;
* ``pipeline``: the one path every method takes (draft run, prompt selection, KV compaction),
  steered by the method's policy facts;
* ``draft_runner`` / ``target_runner``: the flagged requests sent to the draft and target
  ``AsyncLLM`` engines, and the results collected from their workers.

It speaks to the engine processes only through vLLM's public API and
:mod:`specapprox_vllm.wire`; it never imports ``specapprox_vllm.worker``.
"""

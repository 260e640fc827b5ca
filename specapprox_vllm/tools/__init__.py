"""Client-side tooling that runs in its own process, never inside the server.

* ``loadtest``: the load tester (``specapprox-loadtest``) and the soak (``specapprox-soak``);
* ``eval``: prompt generators and scoring, the accuracy sweep, the SpecPC draft-depth eval;
* ``bench``: benchmarks of the methods (throughput, prefill, cost curves, selection cost) and a
  runner of ``vllm bench serve``;
* ``prepare_model`` (``specapprox-prepare-model``) and ``truncate``: model preparation, and a
  draft made of the target's first k layers.

These talk HTTP to a server (one given by ``--base-url``, or one they start and stop
themselves) or start their own engines. The dependency runs one way: the server imports only
``prepare_model`` / ``truncate`` from here, and the engine workers import nothing from here.
Each tool has a ``main()``: ``python -m specapprox_vllm.tools.<package>.<module> --help``.
"""

"""chat-service's benchmark suite. Two entry points (docs/benchmarks.md: how to run them):

* ``python -m benchmarks.bench SCENARIO``: speed, each scenario against a trivial server;
* ``python -m benchmarks.soak``: correctness under faults (kill, SIGTERM, LISTEN cut, slow
  reader), then an exactly-once audit.

The other modules are theirs: ``bench_client`` (the load generator), ``bench_infra`` (the
processes a run starts and stops: PostgreSQL, servers; CPU and memory readings) and
``trivial_server`` (the ceiling ``bench`` runs beside chat-service).
"""

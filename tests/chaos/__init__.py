"""``make chaos``: a scripted, seeded, bounded fault-injection run of the whole product on one machine.

``python -m tests.chaos [--seed N] [--users N] [--transitions N] [--minutes M] [--small]`` starts its
own redis-server (append-only file on), the Attentive sandbox behind a recording proxy
(``tests/chaos/proxy.py``), the webhook receiver, several celery workers and beat; sends a seeded
workload through ``attentive-export ingest``, the webhook receiver and ``attentive-export backfill``
while killing workers and Redis, starting a second beat and turning on the sandbox's faults; then
turns every fault off, waits (bounded) until nothing is outstanding and prints a verdict table
(``tests/chaos/verdict.py``). Exit status 0 only if every check passes.

Modules: ``config`` (sizes and fault knobs), ``workload`` (what is sent, and the expectation),
``procs`` (processes, Redis with AOF, /proc helpers), ``proxy`` (the wire observer and slow jobs),
``run`` (the orchestration), ``verdict`` (the checks).
"""

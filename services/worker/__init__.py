"""The worker process shared by every role (hybrid, prefill, decode): one engine behind
a grpc.aio server, Prometheus metrics, an etcd registration and a graceful drain.

Modules: ``config`` (flags + env + YAML -> one frozen WorkerConfig), ``servicer``
(the ``pdserve.v1.Worker`` RPCs), ``metrics`` (Prometheus), ``process`` (startup,
serving, drain), ``cli`` (``pdserve worker``). Only ``process`` imports the engine.
"""

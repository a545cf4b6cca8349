"""Cluster membership over etcd, shared by workers and the router (no torch, no engine).

- ``keys``: the etcd key layout (``/pdserve/<ns>/workers/<role>/<id>``, ``/pdserve/<ns>/load/<id>``).
- ``records``: the JSON documents stored under those keys.
- ``etcd``: building the one etcd client of a process from an ``http://host:port`` URL.
- ``registry``: a worker's lease, registration, keep-alive and load publishing.
- ``discovery``: the router's watched view of live workers and their load.
- ``kv_peers``: a worker's NIXL peers kept equal to discovery, progress and notifications.
- ``orders``: signing and checking remote-prefill orders with the cluster secret.
- ``rpc_auth``: the Worker-RPC bearer token derived from the cluster secret, and its interceptors.
- ``tls``: TLS material and the transport settings (keepalive, reconnect) of every server and channel.
"""

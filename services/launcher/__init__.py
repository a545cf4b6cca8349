"""``pdserve up``: a local cluster (etcd, router, workers) as child processes on loopback."""

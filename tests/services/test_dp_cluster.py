"""Data parallelism: `pdserve worker --dp 2` runs two replicas, each its own engine, gRPC server
and etcd registration; the router serves through both; when one replica dies the worker stops
the other and exits non-zero, leaving no replica behind. One engine refuses dp itself."""
from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from pdserve.v1 import worker_pb2

from pdserve.engine import LLM
from pdserve.worker.config import build_worker_config
from pdserve.engine.config import ConfigError
from pdserve.worker.replicas import check_ranks_fit, replica_argv, replica_env
from tests.services.cluster_fixture import local_cluster
from tests.services.clients import http_json, live_workers, wait_for, worker_stub


def test_replicas_get_their_own_ports_ids_and_gpus():
    config = build_worker_config({"etcd": "http://x:1", "grpc_port": "7000", "metrics_port": "9000", "dp": "2",
                                  "tp": "1", "device_type": "cuda"}, {}, None)
    argv = ["--dp", "2", "--grpc-port", "7000"]
    assert replica_argv(argv, 1, config, "w") == argv + ["--dp", "1", "--grpc-port", "7001", "--metrics-port",
                                                         "9001", "--worker-id", "w-dp1"]
    assert replica_env({"CUDA_VISIBLE_DEVICES": "4,5"}, 1, config)["CUDA_VISIBLE_DEVICES"] == "5"


def test_ranks_must_fit_the_visible_gpus(caplog):
    cuda = build_worker_config({"etcd": "http://x:1", "dp": "2", "device_type": "cuda"}, {}, None)
    check_ranks_fit(cuda, {"CUDA_VISIBLE_DEVICES": "0,1"}, cores=2)
    with pytest.raises(ConfigError, match=r"dp=2 x tp=1 = 2 ranks need 2 GPUs, but 1 are visible "
                                          r"\(CUDA_VISIBLE_DEVICES=3\)"):
        check_ranks_fit(cuda, {"CUDA_VISIBLE_DEVICES": "3"}, cores=64)
    cpu = build_worker_config({"etcd": "http://x:1", "tp": "3"}, {}, None)
    check_ranks_fit(cpu, {}, cores=2)  # runs, the rank processes share the cores
    assert "3 rank processes on 2 cores" in caplog.text


def test_one_engine_refuses_dp():
    with pytest.raises(ValueError, match="dp=2: one engine is one data-parallel replica"):
        LLM("dummy:smollm2-135m", dp=2)


def test_dp2_worker_serves_through_two_replicas_and_fails_as_a_whole(tmp_path):
    with local_cluster(hybrid=1, log_dir=str(tmp_path), worker_args=("--dp", "2")) as cluster:
        def both() -> list[dict] | None:
            workers = live_workers(cluster.http_url)
            return workers if len(workers) == 2 else None
        workers = wait_for(both, 120.0, what="both replicas to register")
        assert len({w["grpc_address"] for w in workers}) == 2

        def complete(i: int) -> tuple[int, dict]:
            return http_json(f"{cluster.http_url}/v1/completions",
                             {"model": "smollm2", "prompt": f"Hello {i}", "max_tokens": 16, "temperature": 0})
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(complete, range(8)))
        assert all(status == 200 for status, _ in answers), answers

        stats = [worker_stub(w["grpc_address"]).Stats(worker_pb2.StatsRequest(), timeout=5) for w in workers]
        assert all(s.prefills_local > 0 for s in stats), stats  # both replicas served
        parent = cluster.workers[0]
        replicas = psutil.Process(parent.pid).children()
        assert len(replicas) == 2
        replicas[0].send_signal(signal.SIGKILL)
        wait_for(lambda: parent.proc.poll() is not None, 60.0, what="the worker to exit")
        assert parent.proc.returncode != 0
        wait_for(lambda: not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in replicas), 15.0,
                 what="every replica to be gone")

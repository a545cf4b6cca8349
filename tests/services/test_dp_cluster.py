"""Data parallelism: `pdserve worker --dp 2` runs two replicas, each its own engine, gRPC server
and etcd registration; the router serves through both; when one replica dies the worker stops
the other and exits non-zero, leaving no replica behind. One engine refuses dp itself. With
`--ep 2` the replicas share a MoE model's experts (steps in lockstep)."""
from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from pdserve.v1 import worker_pb2

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.worker.config import build_worker_config
from pdserve.engine.config import ConfigError
from pdserve.worker.replicas import check_ranks_fit, replica_argv, replica_env
from tests.disagg.helpers import tokens_of, worker_generate
from tests.engine.conftest import make_tiny_model
from tests.services.cluster_fixture import local_cluster
from tests.services.clients import blocks_used, http_json, live_workers, wait_for, worker_stub


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
    with pytest.raises(ConfigError, match=r"dp=2 x tp=1 = 2 ranks need 2 GPUs with nccl, but 1 are visible "
                                          r"\(CUDA_VISIBLE_DEVICES=3\)"):
        check_ranks_fit(cuda, {"CUDA_VISIBLE_DEVICES": "3"}, cores=64)
    tp2 = build_worker_config({"etcd": "http://x:1", "tp": "2", "device_type": "cuda"}, {}, None)
    with pytest.raises(ConfigError, match=r"tp=2 = 2 ranks need 2 GPUs with nccl, but 1 are visible"):
        check_ranks_fit(tp2, {"CUDA_VISIBLE_DEVICES": "0"}, cores=64)
    shared = build_worker_config({"etcd": "http://x:1", "tp": "2", "dp": "2", "device_type": "cuda",
                                  "tp_backend": "gloo"}, {}, None)
    check_ranks_fit(shared, {"CUDA_VISIBLE_DEVICES": "0,1"}, cores=64)  # gloo: a replica's ranks share its GPU
    with pytest.raises(ConfigError, match=r"ranks need 2 GPUs with gloo, but 1 are visible"):
        check_ranks_fit(shared, {"CUDA_VISIBLE_DEVICES": "0"}, cores=64)
    assert [replica_env({"CUDA_VISIBLE_DEVICES": "4,5"}, i, shared)["CUDA_VISIBLE_DEVICES"] for i in (0, 1)] == \
        ["4", "5"]
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


def test_dp2_ep2_replicas_share_the_experts_of_a_moe_model(tmp_path):
    """`--dp 2 --ep 2`: two replicas, each half of the experts, their own requests and KV; each
    answers exactly as one engine with every expert does, also when only one of them has work
    (the other lends its experts); a dead replica fails the worker as a whole."""
    model = make_tiny_model("mixtral", str(tmp_path))
    prompts = [list(range(10 + 40 * i, 10 + 40 * i + 5 + 11 * i)) for i in range(6)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = [list(o.token_ids) for o in LLM(model, num_blocks=64).generate(prompts, params)]
    with local_cluster(hybrid=1, model=model, log_dir=str(tmp_path / "logs"),
                       worker_args=("--dp", "2", "--ep", "2")) as cluster:
        workers = wait_for(lambda: live_workers(cluster.http_url) if len(live_workers(cluster.http_url)) == 2
                           else None, 120.0, what="both replicas to register")
        first, second = (w["grpc_address"] for w in workers)
        assert tokens_of(worker_generate(first, prompts[0], 8)) == expected[0]  # the other replica idles
        jobs = [(first if i % 2 else second, p) for i, p in enumerate(prompts)]
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda job: tokens_of(worker_generate(job[0], job[1], 8)), jobs))
        assert got == expected
        wait_for(lambda: not any(blocks_used(cluster.http_url).values()), 15.0, what="every block free")
        parent = cluster.workers[0]
        replicas = psutil.Process(parent.pid).children()
        replicas[1].send_signal(signal.SIGKILL)
        wait_for(lambda: parent.proc.poll() is not None, 90.0, what="the worker to exit")
        assert parent.proc.returncode != 0
        wait_for(lambda: not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in replicas), 15.0,
                 what="every replica to be gone")

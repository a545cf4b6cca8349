"""``pdserve up`` as a user runs it: comes up, serves, stops everything on Ctrl-C."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pdserve.launcher.processes import free_port
from tests.services.clients import http_json, wait_for
from tests.services.cluster_fixture import kill_launcher, process_gone

ROOT = Path(__file__).resolve().parents[2]


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def test_pdserve_up_serves_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    """The default topology: 1 prefill + 1 decode worker."""
    http_port, grpc_port = free_port(), free_port()
    argv = [sys.executable, "-m", "pdserve.cli", "up", "--http-port", str(http_port),
            "--grpc-port", str(grpc_port), "--log-dir", str(tmp_path), "--worker-args", "--num-blocks 128",
            "--router-args", "--local-prefill-threshold 1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    out_path = tmp_path / "up.out"
    with open(out_path, "w") as out:
        launcher = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    children: list[int] = []
    try:
        wait_for(lambda: "Ctrl-C stops everything" in out_path.read_text() or launcher.poll() is not None, 240.0,
                 interval=0.2, what="pdserve up ready")
        text = out_path.read_text()
        assert launcher.poll() is None, text
        assert f"http://127.0.0.1:{http_port}/v1" in text and f"127.0.0.1:{grpc_port}" in text and "curl" in text
        assert "1 prefill, 1 decode worker(s)" in text
        etcd_line = next(line for line in text.splitlines() if line.strip().startswith("etcd "))
        assert "https://127.0.0.1:" in etcd_line and "mutual TLS" in etcd_line  # the default etcd needs a client cert
        cert_dir = Path(etcd_line.split("--cacert ", 1)[1].split()[0]).parent
        assert cert_dir.is_dir()
        children = children_of(launcher.pid)
        assert len(children) == 4  # etcd, router, a prefill and a decode worker
        status, body = http_json(f"http://127.0.0.1:{http_port}/v1/completions",
                                 {"model": "smollm2", "prompt": "Hello", "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        assert sorted(w["role"] for w in http_json(f"http://127.0.0.1:{http_port}/workers")[1]) == ["decode", "prefill"]
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(60) == 0
        wait_for(lambda: all(process_gone(pid) for pid in children), 10.0, what="no orphans")
        assert not cert_dir.exists()  # the throwaway etcd certificates go with the cluster
    finally:
        kill_launcher(launcher, children)


def test_gpus_pin_workers_round_robin() -> None:
    import pytest

    from pdserve.launcher.cli import build_parser, spec_from_args
    from pdserve.launcher.cluster import ClusterSpec, LocalCluster

    spec = spec_from_args(build_parser().parse_args(["--prefill", "2", "--decode", "1", "--gpus", "0, 1"]))
    assert spec.gpus == ("0", "1") and spec.roles == ["prefill", "prefill", "decode"]
    cluster = LocalCluster(spec)
    assert [cluster.worker_env(i)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["0", "1", "0"]
    plain = LocalCluster(ClusterSpec()).worker_env(0)
    assert "CUDA_VISIBLE_DEVICES" not in plain or plain["CUDA_VISIBLE_DEVICES"] == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert len(plain["PDSERVE_CLUSTER_SECRET"]) >= 32  # no --gpus: workers see every GPU; P/D orders signed
    with pytest.raises(ValueError, match="gpus"):
        ClusterSpec(gpus=("0,1",))
    from pdserve.launcher.cli import main

    assert main("up", ["--ray", "--gpus", "0"]) == 2  # Ray places workers itself


def test_local_cpu_cluster_gets_a_small_kv_budget_unless_the_user_chose_one() -> None:
    from pdserve.launcher.cli import build_parser, local_worker_args, spec_from_args

    gib = 1 << 30
    spec = spec_from_args(build_parser().parse_args([]), environ={}, available=16 * gib)
    assert spec.worker_args == ("--cache-memory-fraction", "0.0625")  # 1 GiB of 16 GiB free, per worker
    # 2 GiB free, 2 workers: each gets a quarter of its share (256 MiB).
    assert local_worker_args([], 2, "", {}, 2 * gib) == ["--cache-memory-fraction", "0.1250"]
    for user in (["--num-blocks", "64"], ["--num-blocks=64"], ["--cache-memory-fraction", "0.3"],
                 ["--device-type", "cuda"], ["--config", "w.yaml"]):
        assert local_worker_args(user, 2, "", {}, 16 * gib) == user
    assert local_worker_args([], 2, "0,1", {}, 16 * gib) == []
    assert local_worker_args([], 2, "", {"PDSERVE_NUM_BLOCKS": "64"}, 16 * gib) == []
    assert local_worker_args([], 2, "", {}, 0) == []

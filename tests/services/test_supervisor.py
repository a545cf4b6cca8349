"""The worker supervisor of ``pdserve up``: its backoff / give-up policy (pure, with a
fake clock), its loop over real short-lived processes, and a real cluster that loses
its decode worker to SIGKILL and serves again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.launcher.cluster import ClusterSpec, LocalCluster
from pdserve.launcher.processes import Child, free_port
from pdserve.launcher.supervisor import RestartPolicy, Supervisor, describe_exit
from tests.services.clients import http_json, wait_for
from tests.services.cluster_fixture import kill_launcher, process_gone
from tests.services.test_launcher import ROOT, children_of


def test_backoff_doubles_up_to_the_cap_and_gives_up_after_max_restarts() -> None:
    policy = RestartPolicy(max_restarts=7, initial_backoff=1.0, max_backoff=30.0, stable_after=60.0)
    failures, delays = 0, []
    for _ in range(7):
        failures, delay = policy.after_exit(failures, uptime=2.0)
        delays.append(delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert policy.after_exit(failures, uptime=2.0) == (8, None)  # the 8th failure in a row: give up
    assert RestartPolicy(max_restarts=0).after_exit(0, uptime=1000.0) == (1, None)  # never restart


def test_backoff_resets_once_a_worker_stayed_up() -> None:
    policy = RestartPolicy(max_restarts=5, stable_after=60.0)
    assert policy.after_exit(4, uptime=59.9) == (5, 16.0)
    assert policy.after_exit(5, uptime=59.9) == (6, None)
    assert policy.after_exit(5, uptime=60.0) == (1, 1.0)  # stayed up long enough: counts from one again
    with pytest.raises(ValueError):
        RestartPolicy(max_restarts=-1)
    assert describe_exit(-9) == "was killed by SIGKILL" and describe_exit(3) == "exited with code 3"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def crashing_worker(tmp_path: Path, name: str, script: str) -> Child:
    # sh -c SCRIPT $0 $1: "--role decode" reaches the supervisor through argv, as for a real worker
    return Child(name, ["/bin/sh", "-c", script, "--role", "decode"], str(tmp_path / f"{name}.log"))


def test_supervisor_restarts_a_crashing_worker_with_backoff_then_gives_up(tmp_path: Path) -> None:
    cluster, clock, lines = LocalCluster(ClusterSpec()), FakeClock(), []
    supervisor = Supervisor(cluster, RestartPolicy(max_restarts=2), clock=clock, emit=lines.append)
    crasher = cluster.group.spawn(crashing_worker(tmp_path, "worker-0-decode", "echo boom $$; exit 3"))
    steady = cluster.group.spawn(crashing_worker(tmp_path, "worker-1-decode", "exec sleep 60"))
    cluster.workers += [crasher, steady]
    try:
        pids = [crasher.pid]
        for delay in (1.0, 2.0):
            crasher.wait(10.0)
            assert supervisor.poll() is None
            assert f"worker-0-decode (role decode, pid {pids[-1]}) exited with code 3" in lines[-1]
            assert f"restarting it in {delay:g} s" in lines[-1] and f"boom {pids[-1]}" in lines[-1]  # log tail
            clock.now += delay - 0.1
            assert supervisor.poll() is None and not crasher.alive  # still backing off
            clock.now += 0.1
            assert supervisor.poll() is None and lines[-1].startswith("pdserve up: restarted worker-0-decode")
            pids.append(crasher.pid)
        crasher.wait(10.0)
        verdict = supervisor.poll()
        assert verdict is not None and "giving up on worker-0-decode" in verdict and "3 times in a row" in verdict
        assert len(set(pids)) == 3 and steady.alive  # the healthy worker was never touched
        assert (tmp_path / "worker-0-decode.log").read_text().count("=== pdserve up: restarting") == 2
    finally:
        cluster.group.stop_all(5.0)


def test_supervisor_does_not_restart_during_shutdown_and_router_death_is_fatal(tmp_path: Path) -> None:
    cluster, clock, lines = LocalCluster(ClusterSpec()), FakeClock(), []
    stopping = [False]
    supervisor = Supervisor(cluster, RestartPolicy(), clock=clock, emit=lines.append, stopping=lambda: stopping[0])
    worker = cluster.group.spawn(crashing_worker(tmp_path, "worker-0-hybrid", "exit 0"))
    cluster.workers.append(worker)
    try:
        worker.wait(10.0)
        assert supervisor.poll() is None and "exited with code 0" in lines[-1]  # a drain nobody asked for
        stopping[0] = True
        clock.now += 100.0
        assert supervisor.poll() is None and not worker.alive and len(lines) == 1
        cluster.router = cluster.group.spawn(Child("router", ["/bin/sh", "-c", "echo bye; kill -9 $$"],
                                                   str(tmp_path / "router.log")))
        cluster.router.wait(10.0)
        verdict = supervisor.poll()
        assert verdict is not None and "router was killed by SIGKILL" in verdict and "bye" in verdict
    finally:
        cluster.group.stop_all(5.0)


def decode_worker_pids(launcher_pid: int) -> list[int]:
    pids = []
    for pid in children_of(launcher_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in argv and b"decode" in argv:
            pids.append(pid)
    return pids


def completion_ok(http_port: int) -> bool:
    try:
        status, body = http_json(f"http://127.0.0.1:{http_port}/v1/completions",
                                 {"model": "smollm2", "prompt": "Hello", "max_tokens": 3}, timeout=20.0)
    except (OSError, ValueError):  # refused, or an error page that is not JSON
        return False
    return status == 200 and body["usage"]["completion_tokens"] == 3


def test_pdserve_up_restarts_a_killed_decode_worker_and_stops_cleanly(tmp_path: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    argv = [sys.executable, "-m", "pdserve.cli", "up", "--http-port", str(http_port),
            "--grpc-port", str(grpc_port), "--log-dir", str(tmp_path), "--worker-args", "--num-blocks 256",
            "--router-args", "--local-prefill-threshold 1"]
    out_path = tmp_path / "up.out"
    with open(out_path, "w") as out:
        launcher = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"),
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    children: set[int] = set()
    try:
        wait_for(lambda: "Ctrl-C stops everything" in out_path.read_text() or launcher.poll() is not None, 240.0,
                 interval=0.2, what="pdserve up ready")
        assert launcher.poll() is None, out_path.read_text()
        children.update(children_of(launcher.pid))
        assert completion_ok(http_port)
        [old] = decode_worker_pids(launcher.pid)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: "restarted worker-1-decode" in out_path.read_text() or launcher.poll() is not None, 30.0,
                 interval=0.2, what="the supervisor restarting the decode worker")
        text = out_path.read_text()
        assert launcher.poll() is None, text
        assert f"worker-1-decode (role decode, pid {old}) was killed by SIGKILL" in text
        [new] = decode_worker_pids(launcher.pid)
        children.update(children_of(launcher.pid))
        assert new != old
        wait_for(lambda: completion_ok(http_port), 60.0, interval=0.5, what="a completion after the restart")
        workers = http_json(f"http://127.0.0.1:{http_port}/workers")[1]
        assert any(w["role"] == "decode" and f"-{new}-" in w["id"] for w in workers), workers  # a fresh registration
        assert launcher.poll() is None
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0, out_path.read_text()
        wait_for(lambda: all(process_gone(pid) for pid in children), 10.0, what="no orphans")
    finally:
        kill_launcher(launcher, children)

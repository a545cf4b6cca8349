"""``pdserve up --ray`` end to end: a Ray head started by the launcher, one prefill and
one decode worker and the router as Ray actors, one real completion over HTTP, and
nothing left running afterwards. Plus the pure pieces (options, bundles, command plan)
without Ray.

Processes are told apart from anyone else's by a tag in their environment, which
every descendant (Ray's own daemons, actors, pdserve processes, etcd) inherits.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from pdserve.launcher.cluster import ClusterSpec
from pdserve.launcher.processes import free_port, pdserve_command
from pdserve.launcher.ray_cluster import RayOptions, bundles, plan_processes, remote_overrides, start_ray_cluster
from tests.services.clients import http_json, wait_for

TAG = "PDSERVE_RAY_TEST_RUN"
NAMES = ("pdserve.cli", "etcd", "raylet", "gcs_server", "ray::")
WORKER_ARGS = ("--num-blocks", "128")


def tagged_processes(run_id: str) -> dict[int, str]:
    """pid -> command line of live processes carrying ``TAG=run_id`` whose command names a cluster part."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"{TAG}={run_id}".encode() in environ and state != "Z" and any(n in cmdline for n in NAMES):
            found[int(entry)] = cmdline[:160]
    return found


def test_options_validate_and_shape_bundles() -> None:
    assert bundles(RayOptions()) == [{"CPU": 1.0}]
    assert bundles(RayOptions(tp=2, num_gpus_per_worker=1, cpus_per_worker=2)) == [{"CPU": 2, "GPU": 1}] * 2
    assert bundles(RayOptions(num_gpus_per_worker=1, cpus_per_worker=0)) == [{"GPU": 1}]
    for bad in ({"tp": 0}, {"num_gpus_per_worker": -1}, {"cpus_per_worker": 0}):
        with pytest.raises(ValueError):
            RayOptions(**bad)


def test_plan_is_the_process_launchers_commands_and_starts_nothing(tmp_path: Path) -> None:
    spec = ClusterSpec(hybrid=0, prefill=1, decode=1, log_dir=str(tmp_path), worker_args=WORKER_ARGS)
    plan = plan_processes(spec, "http://127.0.0.1:2379")
    assert plan.router.argv[:len(pdserve_command("router"))] == pdserve_command("router")
    roles = [c.argv[c.argv.index("--role") + 1] for c in plan.workers]
    assert roles == ["prefill", "decode"]
    for child in [plan.router, *plan.workers]:
        assert child.proc is None and child.argv[child.argv.index("--etcd") + 1] == "http://127.0.0.1:2379"
        assert child.log_path and child.log_path.startswith(str(tmp_path))
    assert all(c.argv[-2:] == list(WORKER_ARGS) for c in plan.workers)
    assert remote_overrides("10.0.0.7") == ["--host", "10.0.0.7", "--grpc-port", "0", "--metrics-port", "0"]


@pytest.mark.timeout(240)
def test_prefill_and_decode_on_ray_serve_and_stop_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'ray[default]'")
    from pdserve.common.sampling_params import SamplingParams
    from pdserve.engine import LLM

    llm = LLM(model="smollm2", num_blocks=128)
    ref = llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0.0))[0]
    del llm
    run_id = uuid.uuid4().hex
    for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", TAG: run_id}.items():
        monkeypatch.setenv(key, value)
    spec = ClusterSpec(hybrid=0, prefill=1, decode=1, http_port=free_port(), grpc_port=free_port(),
                       log_dir=str(tmp_path), lease_ttl=3, drain_timeout=10.0, worker_args=WORKER_ARGS)
    cluster = start_ray_cluster(spec, RayOptions(address="local", local_num_cpus=2))
    try:
        workers = cluster.wait_ready(180.0)
        assert sorted(w["role"] for w in workers) == ["decode", "prefill"]
        assert cluster.plan.etcd_url.startswith("https://") and cluster.etcd_certs is not None  # mutual TLS
        cert_dir = cluster.etcd_certs.directory
        running = " | ".join(tagged_processes(run_id).values())
        for part in ("pdserve.cli router", "--role prefill", "--role decode", "etcd", "raylet", "gcs_server"):
            assert part in running, f"{part!r} not among {running}"
        status, body = http_json(f"{cluster.http_url}/v1/completions", {
            "model": "smollm2", "prompt": ref.prompt_token_ids, "max_tokens": 8, "temperature": 0}, timeout=120)
        assert status == 200, body
        choice = body["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (ref.text, ref.finish_reason)
        assert body["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)
        assert body["usage"]["completion_tokens"] == len(ref.token_ids)
    finally:
        started = time.monotonic()
        cluster.stop()
        stop_seconds = time.monotonic() - started
    wait_for(lambda: not tagged_processes(run_id), 15.0, interval=0.2, what="no process left")
    assert not os.path.exists(cert_dir)  # the throwaway etcd certificates went with the cluster
    assert stop_seconds < 30.0

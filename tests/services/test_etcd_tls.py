"""etcd over mutual TLS, as ``pdserve up`` runs it: the throwaway certificates, an etcd
that refuses every client without the client certificate, a restart that keeps the
certificates, and the flags the launchers hand the router and workers. No model is
loaded here; the end-to-end cluster on a TLS etcd is in test_e2e_cluster.py and
test_launcher.py."""
from __future__ import annotations

import asyncio
import http.client
import ipaddress
import os
import ssl
import stat
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from etcd3aio import EtcdError

from pdserve.cluster.etcd import connect, retry_until_reachable
from pdserve.cluster.tls import TLSFiles
from pdserve.launcher.certs import EtcdCerts, create_etcd_certs
from pdserve.launcher.cli import build_parser, main, spec_from_args
from pdserve.launcher.cluster import ClusterSpec, LocalCluster
from pdserve.launcher.etcd_server import EtcdServer, start_etcd
from pdserve.launcher.processes import ProcessGroup
from pdserve.launcher.ray_cluster import plan_processes

pytestmark = pytest.mark.timeout(120)


def load(path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCerts]:
    made = create_etcd_certs(parent=str(tmp_path_factory.mktemp("certs")))
    yield made
    made.remove()


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCerts]:
    """Certificates of another throwaway CA: a valid client certificate, but not ours."""
    made = create_etcd_certs(parent=str(tmp_path_factory.mktemp("foreign")))
    yield made
    made.remove()


@pytest.fixture(scope="module")
def etcd(certs: EtcdCerts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdServer, ProcessGroup]]:
    group = ProcessGroup()
    server = start_etcd(group, str(tmp_path_factory.mktemp("etcd-logs")), tls=certs)
    try:
        yield server, group
    finally:
        server.stop()
        group.stop_all(2.0)


def test_certificates_name_etcd_and_are_private(certs: EtcdCerts) -> None:
    directory = Path(certs.directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt", "client.crt", "client.key", "server.crt",
                                                           "server.key"]  # the CA's key is never written
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in directory.iterdir())
    ca, server, client = load(certs.ca), load(certs.server_cert), load(certs.client_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for cert in (ca, server, client):
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
        lifetime = cert.not_valid_after_utc - datetime.now(timezone.utc)
        assert timedelta(days=6) < lifetime <= timedelta(days=7)
    for leaf in (server, client):
        leaf.verify_directly_issued_by(ca)
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert certs.client == TLSFiles(certs.client_cert, certs.client_key, certs.ca)


def test_certificates_are_removed_and_bad_validity_is_refused(tmp_path: Path) -> None:
    made = create_etcd_certs(validity_days=0.5, parent=str(tmp_path))
    assert load(made.server_cert).not_valid_after_utc - datetime.now(timezone.utc) <= timedelta(hours=12)
    made.remove()
    assert not os.path.exists(made.directory)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="validity_days"):
            create_etcd_certs(validity_days=bad, parent=str(tmp_path))
    assert not list(tmp_path.iterdir())  # nothing left behind by the refusals


def health(url: str, context: ssl.SSLContext | None = None) -> int:
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    with urllib.request.build_opener(*handlers).open(f"{url}/health", timeout=5) as response:
        return response.status


def tls_context(ca: str, client: EtcdCerts | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    if client is not None:
        context.load_cert_chain(client.client_cert, client.client_key)
    return context


def test_etcd_http_refuses_clients_without_our_client_certificate(etcd: tuple[EtcdServer, ProcessGroup],
                                                                  certs: EtcdCerts, foreign: EtcdCerts) -> None:
    server, _ = etcd
    assert server.url.startswith("https://127.0.0.1:") and server.client_tls == certs.client
    plain = server.url.replace("https://", "http://")
    with pytest.raises((OSError, http.client.HTTPException)):
        health(plain)
    for client in (None, foreign):  # verifies etcd but presents nothing; another CA's client certificate
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE") as info:
            health(server.url, tls_context(certs.ca, client))
        assert isinstance(info.value.reason, ssl.SSLError)
    assert health(server.url, tls_context(certs.ca, certs)) == 200


async def put_get(url: str, tls: TLSFiles, key: bytes) -> bytes:
    client = await connect(url, tls)
    try:
        await client.kv.put(key, b"value", timeout=5)
        return (await client.kv.get(key, timeout=5)).kvs[0].value
    finally:
        await client.close()


def test_etcd_grpc_serves_only_the_client_certificate(etcd: tuple[EtcdServer, ProcessGroup], certs: EtcdCerts,
                                                      foreign: EtcdCerts) -> None:
    server, _ = etcd
    refused = {"plaintext": (server.url.replace("https://", "http://"), TLSFiles()),
               "CA only": (server.url, TLSFiles(ca=certs.ca)),
               "foreign client certificate": (server.url, TLSFiles(foreign.client_cert, foreign.client_key, certs.ca))}
    for why, (url, tls) in refused.items():
        with pytest.raises(EtcdError):
            asyncio.run(put_get(url, tls, b"/t/refused"))
            pytest.fail(f"{why}: etcd answered")
    with pytest.raises(ValueError, match="--etcd-ca"):
        asyncio.run(put_get(server.url, TLSFiles(), b"/t/x"))  # https without a CA: a clear error, not a hang
    assert asyncio.run(put_get(server.url, server.client_tls, b"/t/ok")) == b"value"


def test_restart_on_the_same_ports_keeps_the_certificates(etcd: tuple[EtcdServer, ProcessGroup],
                                                          tmp_path: Path) -> None:
    """A client made before the restart (the router's, a worker's) goes on without a change."""
    server, group = etcd

    async def body() -> None:
        client = await connect(server.url, server.client_tls)
        await client.kv.put(b"/t/kept", b"before", timeout=5)
        ports, data_dir = server.ports, server.data_dir
        await asyncio.to_thread(server.stop, True)
        restarted = await asyncio.to_thread(start_etcd, group, str(tmp_path), 20.0, ports, data_dir, server.tls)
        assert (restarted.url, restarted.tls) == (server.url, server.tls)
        server.child = restarted.child
        got = await retry_until_reachable(lambda: client.kv.get(b"/t/kept", timeout=2), 20.0, "restarted etcd")
        assert got.kvs[0].value == b"before"
        await client.close()

    asyncio.run(body())


def test_pdserve_up_flags_choose_the_etcd_security(certs: EtcdCerts) -> None:
    parse = build_parser().parse_args
    assert spec_from_args(parse([]), available=0).etcd_tls  # mutual TLS unless asked otherwise
    assert not spec_from_args(parse(["--etcd-plaintext"]), available=0).etcd_tls
    external = spec_from_args(parse(["--etcd", "https://e:2379", "--etcd-ca", certs.ca, "--etcd-cert",
                                     certs.client_cert, "--etcd-key", certs.client_key]), available=0)
    assert external.etcd_client == certs.client
    with pytest.raises(ValueError, match="--etcd-plaintext"):
        spec_from_args(parse(["--etcd", "http://e:2379", "--etcd-plaintext"]), available=0)
    with pytest.raises(ValueError, match="external etcd"):
        spec_from_args(parse(["--etcd-ca", certs.ca]), available=0)
    with pytest.raises(ValueError, match="both a certificate and a key"):
        spec_from_args(parse(["--etcd", "https://e:2379", "--etcd-cert", certs.client_cert]), available=0)
    assert main("up", ["--etcd", "http://e:2379", "--etcd-plaintext"]) == 2
    assert main("up", ["--etcd", "https://e:2379", "--etcd-key", "/no/such.key", "--etcd-cert", certs.client_cert]) == 2


def etcd_flags_of(argv: list[str]) -> dict[str, str]:
    return {flag: argv[argv.index(flag) + 1] for flag in ("--etcd", "--etcd-ca", "--etcd-cert", "--etcd-key")
            if flag in argv}


def test_router_and_workers_get_the_client_certificate(certs: EtcdCerts, tmp_path: Path) -> None:
    """The Ray launcher plans its commands with LocalCluster: both launchers pass the same flags."""
    spec = ClusterSpec(hybrid=0, prefill=1, decode=1, log_dir=str(tmp_path))
    plan = plan_processes(spec, "https://127.0.0.1:2379", certs.client)
    want = {"--etcd": "https://127.0.0.1:2379", "--etcd-ca": certs.ca, "--etcd-cert": certs.client_cert,
            "--etcd-key": certs.client_key}
    assert [etcd_flags_of(c.argv) for c in (plan.router, *plan.workers)] == [want] * 3
    assert plan.etcd_access() == ("https://127.0.0.1:2379", certs.client)
    plain = plan_processes(spec, "http://127.0.0.1:2379")
    assert [etcd_flags_of(c.argv) for c in (plain.router, *plain.workers)] == [{"--etcd": "http://127.0.0.1:2379"}] * 3
    with pytest.raises(RuntimeError, match="start"):
        LocalCluster(spec).etcd_access()
    with pytest.raises(RuntimeError, match="did not start its etcd"):
        plan.restart_etcd()

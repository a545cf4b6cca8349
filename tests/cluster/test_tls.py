"""TLS credentials: a TLS gRPC server answers TLS clients with the right CA and refuses others."""
from __future__ import annotations

import asyncio
import http.client
import ssl
import subprocess

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve.cluster.tls import TLSConfigError, TLSFiles, add_port, open_channel


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=pdserve-test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-days", "1", "-extfile", str(d / "ext.cnf"), "-out", str(d / f"{name}.pem"))
    return d


def test_mutual_tls_roundtrip_and_plaintext_refused(pki):
    server_tls = TLSFiles(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"))
    client_tls = TLSFiles(str(pki / "client.pem"), str(pki / "client.key"), str(pki / "ca.pem"))

    async def main():
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = add_port(server, "127.0.0.1:0", server_tls)
        await server.start()
        try:
            async with open_channel(f"localhost:{port}", client_tls) as ch:
                reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            async with open_channel(f"localhost:{port}", TLSFiles()) as ch:  # plaintext
                with pytest.raises(grpc.aio.AioRpcError):
                    await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
            no_client_cert = TLSFiles(ca=str(pki / "ca.pem"))
            async with open_channel(f"localhost:{port}", no_client_cert) as ch:
                with pytest.raises(grpc.aio.AioRpcError):
                    await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        finally:
            await server.stop(None)

    asyncio.run(main())
    assert client_tls.etcd_conn_args().keys() == {"ca_cert", "cert_key", "cert_chain"}
    assert TLSFiles().etcd_conn_args() == {}


def test_bad_tls_config_is_a_clear_error(tmp_path):
    with pytest.raises(TLSConfigError, match="both a certificate and a key"):
        TLSFiles(cert=str(tmp_path / "x.pem"))
    with pytest.raises(TLSConfigError, match="does not exist"):
        TLSFiles(ca=str(tmp_path / "missing.pem"))


def test_cluster_over_mutual_tls(pki):
    """A real router and worker talking gRPC over mutual TLS serve a request end to end."""
    import json
    import urllib.request

    from tests.services.cluster_fixture import local_cluster

    def files(name: str) -> tuple[str, ...]:
        return ("--tls-cert", str(pki / f"{name}.pem"), "--tls-key", str(pki / f"{name}.key"),
                "--tls-ca", str(pki / "ca.pem"))

    with local_cluster(hybrid=1, worker_args=files("server"), router_args=files("client")) as cluster:
        body = json.dumps({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4,
                           "temperature": 0}).encode()
        assert cluster.http_url.startswith("https://")  # the router's HTTP API is TLS too
        req = urllib.request.Request(f"{cluster.http_url}/v1/completions", body, {"Content-Type": "application/json"})
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.check_hostname = False  # the certificate names localhost; the test dials 127.0.0.1
        with urllib.request.urlopen(req, timeout=120, context=context) as resp:
            out = json.load(resp)
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP is not served
            urllib.request.urlopen(cluster.http_url.replace("https://", "http://") + "/health", timeout=10)
        assert out["choices"][0]["finish_reason"] in ("stop", "length")
        assert out["usage"]["completion_tokens"] >= 1

"""Throwaway TLS material for the etcd that ``pdserve up`` starts.

Owns: one private directory (mode 0700) holding a fresh CA certificate and two
certificates it signed, all ECDSA P-256 and valid for a few days: etcd's server
certificate (names ``127.0.0.1`` and ``localhost``) and one client certificate that
the router and every worker present to etcd (etcd runs with ``--client-cert-auth``,
so a process without it cannot read or write the cluster's keys). Every file is
0600. The CA's private key never touches the disk: nothing can sign another
certificate once ``create_etcd_certs()`` has returned.

Lifecycle: ``create_etcd_certs()`` makes the directory and its files -> etcd gets the
server files (the same ones again when it is restarted), the router and workers
``EtcdCerts.client`` -> ``EtcdCerts.remove()`` deletes the directory when the cluster
stops.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pdserve.cluster.tls import TLSFiles


@dataclass(frozen=True)
class EtcdCerts:
    """Paths of the PEM files in ``directory``."""
    directory: str
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    @property
    def client(self) -> TLSFiles:
        """What a client of this etcd needs: the client certificate, its key and the CA."""
        return TLSFiles(self.client_cert, self.client_key, self.ca)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(frozen=True)
class _Validity:
    not_before: datetime
    not_after: datetime


def create_etcd_certs(validity_days: float = 7.0, parent: str | None = None) -> EtcdCerts:
    """A new CA, etcd server and client certificate in a new private directory under
    ``parent`` (default: the system temp directory)."""
    if not validity_days > 0:
        raise ValueError(f"validity_days={validity_days!r}: expected a number of days > 0")
    now = datetime.now(timezone.utc)
    # NOTE: backdated a little so a clock a few minutes behind ours still accepts them.
    validity = _Validity(now - timedelta(minutes=5), now + timedelta(days=validity_days))
    directory = tempfile.mkdtemp(prefix="pdserve-etcd-tls-", dir=parent)  # mode 0700
    try:
        return _write_all(directory, validity)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _write_all(directory: str, validity: _Validity) -> EtcdCerts:
    ca_key = _new_key()
    ca_cert = _ca_certificate(ca_key, validity)
    server_key, client_key = _new_key(), _new_key()
    # etcd's built-in gRPC gateway dials etcd itself with the server certificate: it must be a client one too.
    server_cert = _leaf_certificate("pdserve-etcd", server_key, ca_cert, ca_key, validity,
                                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    client_cert = _leaf_certificate("pdserve-etcd-client", client_key, ca_cert, ca_key, validity,
                                    [ExtendedKeyUsageOID.CLIENT_AUTH], [])
    files = {"ca.crt": _cert_pem(ca_cert), "server.crt": _cert_pem(server_cert), "server.key": _key_pem(server_key),
             "client.crt": _cert_pem(client_cert), "client.key": _key_pem(client_key)}  # EtcdCerts' field order
    for name, data in files.items():
        _write_private(os.path.join(directory, name), data)
    return EtcdCerts(directory, *(os.path.join(directory, name) for name in files))


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pdserve"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             validity: _Validity) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity.not_before).not_valid_after(validity.not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not signs_certificates, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=signs_certificates,
                         crl_sign=signs_certificates, encipher_only=False, decipher_only=False)


def _ca_certificate(key: ec.EllipticCurvePrivateKey, validity: _Validity) -> x509.Certificate:
    name = _name("pdserve-etcd-ca")
    return (_builder(name, name, key, validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(signs_certificates=True), critical=True)
            .sign(key, hashes.SHA256()))


def _leaf_certificate(common_name: str, key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                      ca_key: ec.EllipticCurvePrivateKey, validity: _Validity,
                      usages: list[x509.ObjectIdentifier], names: list[x509.GeneralName]) -> x509.Certificate:
    builder = (_builder(_name(common_name), ca_cert.subject, key, validity)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_key_usage(signs_certificates=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: str, data: bytes) -> None:
    """Create ``path`` readable by its owner only (refusing to reuse an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)

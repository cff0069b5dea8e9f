"""What the security tests share: the test secret, a health check, and a
throwaway PKI (a cluster CA with a leaf for 127.0.0.1, and a rogue CA's leaf)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvtransfer.security import ClusterSecurity, TlsFiles

SECRET = "a-test-secret-of-the-cluster-0123"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
SERVING = health_pb2.HealthCheckResponse.SERVING


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    req = health_pb2.HealthCheckRequest(service=service)
    return int((await health_pb2_grpc.HealthStub(channel).Check(req, timeout=10)).status)


@dataclass
class Pki:
    ca: Path
    cert: Path  # the cluster's certificate, for 127.0.0.1, signed by `ca`
    key: Path
    rogue_cert: Path  # for 127.0.0.1 too, signed by another CA
    rogue_key: Path

    def security(self, secret: str | None = None) -> ClusterSecurity:
        return ClusterSecurity(
            secret=secret, tls=TlsFiles.load(str(self.cert), str(self.key), str(self.ca))
        )

    def argv(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]


def _ca(name: str) -> tuple[object, object]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert, key


def _leaf(ca_cert: object, ca_key: object, tmp: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (IP SAN), for servers and clients alike."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    assert isinstance(ca_cert, x509.Certificate) and isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def make_pki(tmp: Path) -> Pki:
    """A cluster CA with one leaf for 127.0.0.1, and a rogue CA's leaf."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_cert, ca_key = _ca("splitserve test CA")
    assert isinstance(ca_cert, x509.Certificate)
    (tmp / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert, key = _leaf(ca_cert, ca_key, tmp, "cluster")
    rogue_ca, rogue_ca_key = _ca("someone else's CA")
    rogue_cert, rogue_key = _leaf(rogue_ca, rogue_ca_key, tmp, "rogue")
    return Pki(tmp / "ca.pem", cert, key, rogue_cert, rogue_key)

# Theory of operation
# -------------------
# A development certificate so that "tsproxy" with an ssl port works out of the box.  On
# first start ensure_dev_certs() creates, under STATE_DIR/devcert/:
#
#   ca.pem          a self-signed development CA (trust it in your test client)
#   ca.key          its key (0600), kept so the server cert can be re-issued
#   server.pem      an ECDSA P-256 leaf for localhost, 127.0.0.1 and ::1, then the CA
#   server.key      the leaf's key (0600)
#
# Later starts reuse the files as long as they parse, the leaf matches its key, chains to
# the CA, and neither certificate expires within a day; otherwise everything is generated
# again.  Files are written to a temporary name and renamed, so a crash never leaves half
# a certificate.  Uses cryptography only (trustme is a test dependency).
"""Development CA and localhost server certificate for first starts."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ensure_dev_certs"]

_CA_DAYS = 3650
_LEAF_DAYS = 825
_MARGIN = datetime.timedelta(days=1)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _generate(ca_path: Path, ca_key_path: Path, cert_path: Path, key_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tsproxy development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "tsproxy development CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=_LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    _write(ca_key_path, _key_pem(ca_key), 0o600)
    _write(key_path, _key_pem(key), 0o600)
    _write(ca_path, ca_pem, 0o644)
    _write(cert_path, leaf.public_bytes(serialization.Encoding.PEM) + ca_pem, 0o644)


def _usable(ca_path: Path, cert_path: Path, key_path: Path) -> bool:
    try:
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        leaf = chain[0]
        if key.public_key() != leaf.public_key():
            return False
        leaf.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, IndexError, InvalidSignature):
        return False
    soon = datetime.datetime.now(datetime.UTC) + _MARGIN
    return all(c.not_valid_after_utc > soon for c in (ca, leaf))


def ensure_dev_certs(state_dir: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server chain pem, server key pem) under state_dir/devcert, made when needed."""
    directory = state_dir / "devcert"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    if not _usable(ca_path, cert_path, key_path):
        _generate(ca_path, ca_key_path, cert_path, key_path)
    return ca_path, cert_path, key_path

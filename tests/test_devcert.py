"""Development certificates: generated once, reused, regenerated when broken; verify for localhost."""

from __future__ import annotations

import contextlib
import datetime
import os
import stat
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL

from iocore.net.tls.context import verify_hostname, verify_ip
from tsproxy.devcert import ensure_dev_certs


def _handshake(ca: Path, cert: Path, key: Path) -> x509.Certificate:
    sctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    sctx.use_certificate_chain_file(str(cert).encode())
    sctx.use_privatekey_file(str(key).encode())
    cctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    cctx.load_verify_locations(str(ca).encode())
    cctx.set_verify(SSL.VERIFY_PEER)
    server, client = SSL.Connection(sctx), SSL.Connection(cctx)
    server.set_accept_state()
    client.set_connect_state()
    client.set_tlsext_host_name(b"localhost")
    for _ in range(10):
        for conn in (client, server):
            with contextlib.suppress(SSL.WantReadError):
                conn.do_handshake()
        for src, dst in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                dst.bio_write(src.bio_read(65536))
    peer = client.get_peer_certificate(as_cryptography=True)
    assert peer is not None
    return peer


def test_generated_chain_verifies_for_localhost(tmp_path: Path) -> None:
    ca, cert, key = ensure_dev_certs(tmp_path)
    assert ca.parent == tmp_path / "devcert"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "devcert" / "ca.key").stat().st_mode) == 0o600
    peer = _handshake(ca, cert, key)
    assert verify_hostname(peer, "localhost")
    assert verify_ip(peer, "127.0.0.1") and verify_ip(peer, "::1")
    assert peer.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_reused_then_regenerated_when_broken(tmp_path: Path) -> None:
    first = ensure_dev_certs(tmp_path)
    before = first[1].read_bytes()
    assert ensure_dev_certs(tmp_path) == first
    assert first[1].read_bytes() == before  # reused

    first[2].write_bytes(b"garbage")
    ensure_dev_certs(tmp_path)
    assert first[1].read_bytes() != before
    _handshake(*first)


def test_regenerated_when_expired(tmp_path: Path) -> None:
    ca, cert, key = ensure_dev_certs(tmp_path)
    leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    assert leaf.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)
    # Replace the leaf by an expired one, properly issued by the dev CA.
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP256R1())
    ca_key = serialization.load_pem_private_key((tmp_path / "devcert" / "ca.key").read_bytes(), None)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    expired = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(leaf.issuer)
        .public_key(k.public_key())
        .serial_number(1)
        .not_valid_before(past)
        .not_valid_after(past + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    os.utime(cert)
    ensure_dev_certs(tmp_path)
    _handshake(ca, cert, key)

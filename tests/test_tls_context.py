"""Server and client SSL contexts: real handshakes over memory BIOs with trustme certificates."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib

from iocore.net.ssl_config import SSLConfigParams
from iocore.net.tls import _openssl
from iocore.net.tls.context import (
    TICKET_KEY_LEN,
    CertKeyPair,
    build_client_context,
    build_server_context,
    load_or_create_ticket_keys,
    session_reused,
    ticket_keys_supported,
    verify_hostname,
    verify_ip,
    verify_result,
)
from iocore.net.tls.errors import TLSError
from iocore.records.errors import ConfigError

VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


# ----------------------------------------------------------------------------- helpers


def params(tmp_path: Path, **rec: object) -> SSLConfigParams:
    return SSLConfigParams.from_records(rec, tmp_path)


def write_leaf(
    tmp_path: Path, ca: trustme.CA, name: str, *idents: str, key_type=trustme.KeyType.ECDSA
) -> CertKeyPair:
    leaf = ca.issue_cert(*(idents or ("localhost",)), key_type=key_type)
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return CertKeyPair(cert, key)


def client_ctx(ca: trustme.CA | None, version: str | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if ca is not None:
        ca.configure_trust(ctx)
        ctx.set_verify(SSL.VERIFY_PEER)
    if version is not None:
        ctx.set_min_proto_version(VERSIONS[version])
        ctx.set_max_proto_version(VERSIONS[version])
    return ctx


def pump(a: SSL.Connection, b: SSL.Connection) -> bool:
    moved = False
    for src, dst in ((a, b), (b, a)):
        while True:
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                break
            if not data:
                break
            dst.bio_write(data)
            moved = True
    return moved


def handshake(
    cctx: SSL.Context,
    sctx: SSL.Context,
    sni: bytes | None = b"localhost",
    session: SSL.Session | None = None,
) -> tuple[SSL.Connection, SSL.Connection]:
    """Drive a full handshake, then let the client read post-handshake messages (TLS 1.3 tickets)."""
    server = SSL.Connection(sctx)
    server.set_accept_state()
    client = SSL.Connection(cctx)
    client.set_connect_state()
    if sni:
        client.set_tlsext_host_name(sni)
    if session is not None:
        client.set_session(session)
    done = {"c": False, "s": False}
    for _ in range(30):
        for key, conn in (("c", client), ("s", server)):
            if done[key]:
                continue
            try:
                conn.do_handshake()
                done[key] = True
            except SSL.WantReadError:
                pass
        moved = pump(client, server)
        if done["c"] and done["s"] and not moved:
            break
    assert done["c"] and done["s"], "handshake did not finish"
    settle(client, server)
    return client, server


def settle(client: SSL.Connection, server: SSL.Connection) -> None:
    for _ in range(5):
        for conn in (client, server):
            with contextlib.suppress(SSL.WantReadError):
                conn.recv(1)
        if not pump(client, server):
            break


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ecdsa(tmp_path: Path, ca: trustme.CA) -> CertKeyPair:
    return write_leaf(tmp_path, ca, "ecdsa", "localhost", "*.example.com")


@pytest.fixture
def rsa(tmp_path: Path, ca: trustme.CA) -> CertKeyPair:
    return write_leaf(tmp_path, ca, "rsa", "localhost", key_type=trustme.KeyType.RSA)


def peer_key(conn: SSL.Connection) -> object:
    cert = conn.get_peer_certificate(as_cryptography=True)
    assert cert is not None
    return cert.public_key()


# ----------------------------------------------------------------------------- server side


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_handshake_and_versions(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair, version: str) -> None:
    sctx = build_server_context(params(tmp_path), [ecdsa], None, None)
    client, server = handshake(client_ctx(ca, version), sctx)
    assert client.get_protocol_version_name() == f"TLSv{version}"
    client.send(b"ping")
    pump(client, server)
    assert server.recv(10) == b"ping"


@pytest.mark.parametrize("version", [SSL.TLS1_VERSION, SSL.TLS1_1_VERSION])
def test_old_protocols_refused_by_default(
    tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair, version: int
) -> None:
    sctx = build_server_context(params(tmp_path), [ecdsa], None, None)
    cctx = client_ctx(ca)
    cctx.set_min_proto_version(version)
    cctx.set_max_proto_version(version)
    with pytest.raises(SSL.Error):
        handshake(cctx, sctx)


def test_all_versions_disabled_is_config_error(tmp_path: Path, ecdsa: CertKeyPair) -> None:
    p = params(tmp_path, **{"proxy.config.ssl.TLSv1_2": 0, "proxy.config.ssl.TLSv1_3": 0})
    with pytest.raises(ConfigError, match="every TLS version is disabled"):
        build_server_context(p, [ecdsa], None, None)


def test_only_tls13_when_tls12_off(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair) -> None:
    sctx = build_server_context(params(tmp_path, **{"proxy.config.ssl.TLSv1_2": 0}), [ecdsa], None, None)
    with pytest.raises(SSL.Error):
        handshake(client_ctx(ca, "1.2"), sctx)
    client, _ = handshake(client_ctx(ca), sctx)
    assert client.get_protocol_version_name() == "TLSv1.3"


def test_tls13_ciphersuites_applied(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair) -> None:
    p = params(tmp_path, **{"proxy.config.ssl.server.TLSv1_3.cipher_suites": "TLS_CHACHA20_POLY1305_SHA256"})
    client, _ = handshake(client_ctx(ca, "1.3"), build_server_context(p, [ecdsa], None, None))
    assert client.get_cipher_name() == "TLS_CHACHA20_POLY1305_SHA256"


def test_honor_cipher_order(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair) -> None:
    order = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256"
    cctx = client_ctx(ca, "1.2")
    cctx.set_cipher_list(b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")
    for honor, expected in ((1, "ECDHE-ECDSA-AES256-GCM-SHA384"), (0, "ECDHE-ECDSA-AES128-GCM-SHA256")):
        p = params(
            tmp_path,
            **{
                "proxy.config.ssl.server.cipher_suite": order,
                "proxy.config.ssl.server.honor_cipher_order": honor,
            },
        )
        client, _ = handshake(cctx, build_server_context(p, [ecdsa], None, None))
        assert client.get_cipher_name() == expected


def test_bad_cipher_lists_are_config_errors(tmp_path: Path, ecdsa: CertKeyPair) -> None:
    with pytest.raises(ConfigError, match=r"proxy\.config\.ssl\.server\.cipher_suite"):
        build_server_context(
            params(tmp_path, **{"proxy.config.ssl.server.cipher_suite": "NOPE"}), [ecdsa], None, None
        )
    with pytest.raises(ConfigError, match=r"TLSv1_3\.cipher_suites"):
        build_server_context(
            params(tmp_path, **{"proxy.config.ssl.server.TLSv1_3.cipher_suites": "NOPE"}), [ecdsa], None, None
        )


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_ecdsa_and_rsa_in_one_context(
    tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair, rsa: CertKeyPair, version: str
) -> None:
    sctx = build_server_context(params(tmp_path), [ecdsa, rsa], None, None)
    client, _ = handshake(client_ctx(ca, version), sctx)
    assert isinstance(peer_key(client), ec.EllipticCurvePublicKey)

    rsa_only = client_ctx(ca, version)
    assert _lib.SSL_CTX_set1_sigalgs_list(rsa_only._context, b"rsa_pss_rsae_sha256:RSA+SHA256") == 1
    client, _ = handshake(rsa_only, sctx)
    assert not isinstance(peer_key(client), ec.EllipticCurvePublicKey)


def test_rsa_cipher_only_tls12_client_gets_rsa(
    tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair, rsa: CertKeyPair
) -> None:
    sctx = build_server_context(params(tmp_path), [rsa, ecdsa], None, None)
    cctx = client_ctx(ca, "1.2")
    cctx.set_cipher_list(b"ECDHE-RSA-AES128-GCM-SHA256")
    client, _ = handshake(cctx, sctx)
    assert not isinstance(peer_key(client), ec.EllipticCurvePublicKey)


def _renegotiate(client: SSL.Connection, server: SSL.Connection) -> None:
    assert client.renegotiate()
    for _ in range(8):
        with contextlib.suppress(SSL.WantReadError):
            client.do_handshake()
        with contextlib.suppress(SSL.WantReadError):
            server.recv(10)  # the server meets the new ClientHello while reading application data
        pump(client, server)


def test_renegotiation_refused(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair) -> None:
    sctx = build_server_context(params(tmp_path), [ecdsa], None, None)
    client, server = handshake(client_ctx(ca, "1.2"), sctx)
    with pytest.raises(SSL.Error, match="no renegotiation"):
        _renegotiate(client, server)


def test_renegotiation_allowed_when_configured(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair) -> None:
    p = params(tmp_path, **{"proxy.config.ssl.allow_client_renegotiation": 1})
    client, server = handshake(client_ctx(ca, "1.2"), build_server_context(p, [ecdsa], None, None))
    _renegotiate(client, server)
    assert not client.renegotiate_pending()


def test_key_not_matching_cert(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair, rsa: CertKeyPair) -> None:
    other = write_leaf(tmp_path, ca, "other")
    with pytest.raises(ConfigError) as err:
        build_server_context(params(tmp_path), [CertKeyPair(ecdsa.cert, other.key)], None, None)
    assert str(other.key) in str(err.value) and "does not match" in str(err.value)
    with pytest.raises(ConfigError, match="does not match"):
        build_server_context(params(tmp_path), [CertKeyPair(ecdsa.cert, rsa.key)], None, None)


def test_missing_files(tmp_path: Path, ecdsa: CertKeyPair) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=r"nope\.pem: cannot read certificate"):
        build_server_context(params(tmp_path), [CertKeyPair(missing, ecdsa.key)], None, None)
    with pytest.raises(ConfigError, match=r"nope\.pem: cannot read private key"):
        build_server_context(params(tmp_path), [CertKeyPair(ecdsa.cert, missing)], None, None)


def test_key_inside_cert_file(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair) -> None:
    sctx = build_server_context(params(tmp_path), [CertKeyPair(ecdsa.cert, ecdsa.cert)], None, None)
    handshake(client_ctx(ca), sctx)


def test_intermediate_chain_from_ca_chain_file(tmp_path: Path, ca: trustme.CA) -> None:
    inter = ca.create_child_ca()
    leaf = inter.issue_cert("localhost")
    cert, key, chain = tmp_path / "l.crt", tmp_path / "l.key", tmp_path / "chain.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    inter.cert_pem.write_to_path(str(chain))
    with pytest.raises(SSL.Error):
        handshake(
            client_ctx(ca), build_server_context(params(tmp_path), [CertKeyPair(cert, key)], None, None)
        )
    handshake(client_ctx(ca), build_server_context(params(tmp_path), [CertKeyPair(cert, key)], chain, None))


def test_encrypted_key_with_passphrase(tmp_path: Path, ca: trustme.CA) -> None:
    leaf = ca.issue_cert("localhost")
    cert, key = tmp_path / "e.crt", tmp_path / "e.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    pkey = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    key.write_bytes(
        pkey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"sesame"),
        )
    )
    with pytest.raises(ConfigError, match=r"e\.key: bad private key \(or wrong passphrase\)"):
        build_server_context(params(tmp_path), [CertKeyPair(cert, key)], None, None, passphrase=b"wrong")
    with pytest.raises(ConfigError, match=r"e\.key: private key is encrypted"):
        build_server_context(params(tmp_path), [CertKeyPair(cert, key)], None, None)
    sctx = build_server_context(params(tmp_path), [CertKeyPair(cert, key)], None, None, passphrase=b"sesame")
    handshake(client_ctx(ca), sctx)


# ----------------------------------------------------------------------------- client certificates


def _mtls(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair, level: int) -> SSL.Context:
    ca_file = tmp_path / "clients-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    p = params(
        tmp_path,
        **{
            "proxy.config.ssl.client.certification_level": level,
            "proxy.config.ssl.CA.cert.filename": str(ca_file),
        },
    )
    return build_server_context(p, [ecdsa], None, None)


def _client_with_cert(ca: trustme.CA, issuer: trustme.CA, version: str) -> SSL.Context:
    cctx = client_ctx(ca, version)
    leaf = issuer.issue_cert("client@example.com")
    cctx.use_certificate(x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()))
    cctx.use_privatekey(serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None))
    return cctx


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_client_cert_level_1(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair, version: str) -> None:
    sctx = _mtls(tmp_path, ca, ecdsa, 1)
    client, server = handshake(client_ctx(ca, version), sctx)
    assert server.get_peer_certificate() is None
    ca_subject = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject.public_bytes()
    assert [n.der() for n in client.get_client_ca_list()] == [ca_subject]
    client, server = handshake(_client_with_cert(ca, ca, version), sctx)
    assert server.get_peer_certificate() is not None


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_client_cert_level_2(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair, version: str) -> None:
    sctx = _mtls(tmp_path, ca, ecdsa, 2)
    with pytest.raises(SSL.Error):
        handshake(client_ctx(ca, version), sctx)
    with pytest.raises(SSL.Error):
        handshake(_client_with_cert(ca, trustme.CA(), version), sctx)
    _, server = handshake(_client_with_cert(ca, ca, version), sctx)
    assert server.get_peer_certificate() is not None


def test_client_cert_level_needs_ca(tmp_path: Path, ecdsa: CertKeyPair) -> None:
    p = params(tmp_path, **{"proxy.config.ssl.client.certification_level": 2})
    with pytest.raises(ConfigError, match=r"CA\.cert\.filename"):
        build_server_context(p, [ecdsa], None, None)


# ----------------------------------------------------------------------------- socket BIO


@pytest.mark.parametrize("reverse_mapping", [True, False])
@pytest.mark.parametrize("read_ahead", [True, False])
def test_socket_bio_after_memory_bio_handshake(
    tmp_path: Path,
    ca: trustme.CA,
    ecdsa: CertKeyPair,
    read_ahead: bool,
    reverse_mapping: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What SSLNetVConnection does: handshake over memory BIOs, then SSL_set_fd. With
    read-ahead (set before the handshake) one read(2) takes every record the peer queued and
    SSL_has_pending reports the rest; without it OpenSSL takes one record at a time. Without
    pyOpenSSL's reverse map (HAVE_REVERSE_MAPPING False) the connection works the same."""
    assert _openssl.HAVE_SOCKET_BIO, "SSL_ctrl / SSL_has_pending not found: TLS stays on memory BIOs"
    monkeypatch.setattr(_openssl, "HAVE_REVERSE_MAPPING", reverse_mapping)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        peer = SSL.Connection(client_ctx(ca, "1.3"), theirs)
        peer.set_connect_state()
        sctx = build_server_context(params(tmp_path), [ecdsa], None, load_or_create_ticket_keys(None))
        server = SSL.Connection(sctx)
        server.set_accept_state()
        if read_ahead:
            _openssl.set_read_ahead(server)
        # Handshake: the peer on its socket, the server on memory BIOs bridged to ours.
        theirs.setblocking(False)
        ours.setblocking(False)
        done = False
        for _ in range(50):
            with contextlib.suppress(SSL.WantReadError):
                peer.do_handshake()
            with contextlib.suppress(BlockingIOError):
                server.bio_write(ours.recv(65536))
            with contextlib.suppress(SSL.WantReadError):
                server.do_handshake()
                done = True
            with contextlib.suppress(SSL.WantReadError):
                ours.send(server.bio_read(65536))
            if done:
                break
        assert done
        assert _openssl.SSL_set_fd(server, ours.fileno())
        assert (server._ssl in SSL.Connection._reverse_mapping) is not reverse_mapping
        theirs.setblocking(True)
        for i in range(3):  # three records, all in our socket buffer before the first read
            peer.sendall(b"%d" % i * 100)
        assert server.recv(1000) == b"0" * 100
        assert _openssl.SSL_has_pending(server._ssl) == (1 if read_ahead else 0)
        assert server.recv(1000) == b"1" * 100
        assert server.recv(1000) == b"2" * 100
        assert _openssl.SSL_has_pending(server._ssl) == 0
        with pytest.raises(SSL.WantReadError):
            server.recv(1000)
        server.sendall(b"pong")
        assert peer.recv(100) == b"pong"


# ----------------------------------------------------------------------------- session tickets


def test_binding_can_set_ticket_keys() -> None:
    assert ticket_keys_supported()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_ticket_resumption_across_contexts(
    tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair, version: str
) -> None:
    keys = load_or_create_ticket_keys(None)
    a = build_server_context(params(tmp_path), [ecdsa], None, keys)
    b = build_server_context(params(tmp_path), [ecdsa], None, keys)  # another worker, or after a reload
    cctx = client_ctx(ca, version)
    client, _ = handshake(cctx, a)
    assert not session_reused(client)
    session = client.get_session()
    assert session is not None
    client, server = handshake(cctx, b, session=session)
    assert session_reused(client) and session_reused(server)

    other = build_server_context(params(tmp_path), [ecdsa], None, load_or_create_ticket_keys(None))
    client, _ = handshake(cctx, other, session=session)
    assert not session_reused(client)


def test_without_ticket_key_functions_contexts_keep_their_own_keys(
    tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback when SSL_CTX_ctrl / SSL_CTX_set_num_tickets cannot be found: contexts build,
    handshake and resume on the same context (OpenSSL's own per-context ticket keys); a
    ticket from another context is not accepted."""
    monkeypatch.setattr(_openssl, "HAVE_TICKET_KEYS", False)
    monkeypatch.setattr(_openssl, "HAVE_NUM_TICKETS", False)
    assert not ticket_keys_supported()
    keys = load_or_create_ticket_keys(None)
    a = build_server_context(params(tmp_path), [ecdsa], None, keys, ticket_number=1)
    b = build_server_context(params(tmp_path), [ecdsa], None, keys, ticket_number=1)
    cctx = client_ctx(ca, "1.3")
    client, _ = handshake(cctx, a)
    session = client.get_session()
    assert session is not None
    client, _ = handshake(cctx, a, session=session)
    assert session_reused(client)
    client, _ = handshake(cctx, b, session=session)
    assert not session_reused(client)


def test_tickets_disabled_and_number_zero(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair) -> None:
    keys = load_or_create_ticket_keys(None)
    for kwargs in ({"ticket_enabled": False}, {"ticket_number": 0}):
        a = build_server_context(params(tmp_path), [ecdsa], None, keys, **kwargs)  # type: ignore[arg-type]
        b = build_server_context(params(tmp_path), [ecdsa], None, keys, **kwargs)  # type: ignore[arg-type]
        cctx = client_ctx(ca, "1.3")
        client, _ = handshake(cctx, a)
        session = client.get_session()
        assert session is not None
        client, _ = handshake(cctx, b, session=session)
        assert not session_reused(client), kwargs


def test_ticket_key_file_formats(tmp_path: Path) -> None:
    assert len(load_or_create_ticket_keys(None)) == TICKET_KEY_LEN
    assert load_or_create_ticket_keys(None) != load_or_create_ticket_keys(None)
    raw = tmp_path / "k80"
    raw.write_bytes(bytes(range(80)))
    assert load_or_create_ticket_keys(raw) == bytes(range(80))
    ats = tmp_path / "k48"
    ats.write_bytes(bytes(range(96)))  # two ATS keys; the first is current
    derived = load_or_create_ticket_keys(ats)
    assert len(derived) == 80 and derived[:16] == bytes(range(16))
    assert derived == load_or_create_ticket_keys(ats)
    bad = tmp_path / "bad"
    bad.write_bytes(b"x" * 50)
    with pytest.raises(ConfigError, match="bad: session ticket key file is 50 bytes"):
        load_or_create_ticket_keys(bad)
    with pytest.raises(ConfigError, match="missing: cannot read"):
        load_or_create_ticket_keys(tmp_path / "missing")
    with pytest.raises(ValueError):
        build_server_context(params(tmp_path), [], None, b"short")


# ----------------------------------------------------------------------------- client (origin) side


def _origin(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair) -> SSL.Context:
    return build_server_context(params(tmp_path), [ecdsa], None, None)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_client_context_enforced(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair, version: str) -> None:
    ca_file = tmp_path / "origin-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    v = "proxy.config.ssl.client.TLSv1_2" if version == "1.3" else "proxy.config.ssl.client.TLSv1_3"
    good = params(tmp_path, **{"proxy.config.ssl.client.CA.cert.filename": str(ca_file), v: 0})
    client, _ = handshake(build_client_context(good), _origin(tmp_path, ca, ecdsa))
    assert client.get_protocol_version_name() == f"TLSv{version}"
    cert = client.get_peer_certificate()
    assert cert is not None and verify_hostname(cert, "localhost") and not verify_hostname(cert, "evil.com")

    wrong_ca = tmp_path / "wrong-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(wrong_ca))
    bad = params(tmp_path, **{"proxy.config.ssl.client.CA.cert.filename": str(wrong_ca)})
    with pytest.raises(SSL.Error):
        handshake(build_client_context(bad), _origin(tmp_path, ca, ecdsa))


def test_client_context_permissive_and_disabled(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair) -> None:
    wrong_ca = tmp_path / "wrong-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(wrong_ca))
    permissive = params(
        tmp_path,
        **{
            "proxy.config.ssl.client.CA.cert.filename": str(wrong_ca),
            "proxy.config.ssl.client.verify.server.policy": "PERMISSIVE",
        },
    )
    client, _ = handshake(build_client_context(permissive), _origin(tmp_path, ca, ecdsa))
    code, text = verify_result(client)  # the failure is there for the caller to log
    assert code != 0 and text != "ok"
    disabled = params(tmp_path, **{"proxy.config.ssl.client.verify.server": 0})
    handshake(build_client_context(disabled), _origin(tmp_path, ca, ecdsa))


def test_client_context_presents_client_cert(tmp_path: Path, ca: trustme.CA, ecdsa: CertKeyPair) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    mine = write_leaf(tmp_path, ca, "proxy-client", "proxy.example")
    p = params(
        tmp_path,
        **{
            "proxy.config.ssl.client.CA.cert.filename": str(ca_file),
            "proxy.config.ssl.client.cert.filename": str(mine.cert),
            "proxy.config.ssl.client.private_key.filename": str(mine.key),
        },
    )
    _, server = handshake(build_client_context(p), _mtls(tmp_path, ca, ecdsa, 2))
    peer = server.get_peer_certificate()
    assert peer is not None and verify_hostname(peer, "proxy.example")

    wrong = params(
        tmp_path,
        **{
            "proxy.config.ssl.client.cert.filename": str(mine.cert),
            "proxy.config.ssl.client.private_key.filename": str(ecdsa.key),
        },
    )
    with pytest.raises(ConfigError, match=r"ecdsa\.key: private key does not match"):
        build_client_context(wrong)


def test_client_context_default_trust_and_bad_ciphers(tmp_path: Path) -> None:
    assert build_client_context(params(tmp_path)).get_verify_mode() == SSL.VERIFY_PEER
    with pytest.raises(ConfigError, match=r"client\.cipher_suite"):
        build_client_context(params(tmp_path, **{"proxy.config.ssl.client.cipher_suite": "NOPE"}))


def test_errors_are_tsproxy_errors() -> None:
    assert issubclass(TLSError, Exception) and issubclass(ConfigError, Exception)


# ----------------------------------------------------------------------------- RFC 6125


def _cert(sans: list[x509.GeneralName] | None, cn: str | None = None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(key, hashes.SHA256())


def _leaf(ca: trustme.CA, *idents: str, cn: str | None = None) -> crypto.X509:
    pem = ca.issue_cert(*idents, common_name=cn).cert_chain_pems[0].bytes()
    return crypto.load_certificate(crypto.FILETYPE_PEM, pem)


def test_verify_hostname_rules(ca: trustme.CA) -> None:
    cert = _leaf(ca, "www.Example.org", "*.a.com", "10.1.2.3", cn="cn.example.net")
    assert verify_hostname(cert, "www.example.org")
    assert verify_hostname(cert, "WWW.EXAMPLE.ORG.")
    assert verify_hostname(cert, "x.a.com")
    assert verify_hostname(cert, "X.A.Com")
    assert not verify_hostname(cert, "y.x.a.com")
    assert not verify_hostname(cert, "a.com")
    assert not verify_hostname(cert, "cn.example.net")  # CN ignored when DNS SANs exist
    assert not verify_hostname(cert, "10.1.2.3")
    assert not verify_hostname(cert, "")
    crypto_cert = cert.to_cryptography()
    assert verify_hostname(crypto_cert, "x.a.com")


def test_verify_hostname_cn_only_and_bad_wildcards() -> None:
    cn_only = _cert(None, cn="Legacy.Example.com")
    assert verify_hostname(cn_only, "legacy.example.com")
    ip_only = _cert([x509.IPAddress(ipaddress.ip_address("10.0.0.1"))], cn="ipcn.example.com")
    assert verify_hostname(ip_only, "ipcn.example.com")  # no DNS SAN: the CN counts
    partial = _cert([x509.DNSName("f*.a.com"), x509.DNSName("*f.b.com"), x509.DNSName("www.*.c.com")])
    for name in ("foo.a.com", "xf.b.com", "www.x.c.com"):
        assert not verify_hostname(partial, name)
    too_broad = _cert([x509.DNSName("*.com")])
    assert not verify_hostname(too_broad, "example.com")


def test_verify_ip(ca: trustme.CA) -> None:
    cert = _leaf(ca, "localhost", "127.0.0.1", "::1", cn="10.9.9.9")
    assert verify_ip(cert, "127.0.0.1")
    assert verify_ip(cert, "::1")
    assert verify_ip(cert, "[::1]")
    assert verify_ip(cert, "0:0::1")
    assert not verify_ip(cert, "10.9.9.9")  # never the CN
    assert not verify_ip(cert, "127.0.0.2")
    assert not verify_ip(cert, "localhost")

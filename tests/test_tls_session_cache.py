"""The shared session cache (iocore/net/tls/session_cache.py): slots, torn writes, a forked
writer, and real OpenSSL resumption between two contexts over memory BIOs."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
import trustme
from OpenSSL import SSL

from iocore.net.ssl_config import SSLConfigParams
from iocore.net.tls.context import CertKeyPair, build_server_context
from iocore.net.tls.session_cache import MAX_DER, SLOT_SIZE, SharedSessionCache, session_cache_supported

SID = bytes(range(32))
TAG = b"ctx-tag1"


def test_store_and_lookup() -> None:
    cache = SharedSessionCache(16, timeout=60)
    assert cache.lookup(SID, TAG) is None
    assert cache.store(SID, TAG, b"der bytes", now=1000.0)
    assert cache.lookup(SID, TAG, now=1059.0) == b"der bytes"
    assert cache.lookup(SID, b"othertag", now=1059.0) is None  # another certificate context
    assert cache.lookup(SID, TAG, now=1061.0) is None  # expired
    assert cache.lookup(bytes(32), TAG, now=1059.0) is None
    cache.remove(SID)
    assert cache.lookup(SID, TAG, now=1001.0) is None


def test_bounds() -> None:
    cache = SharedSessionCache(4)
    assert not cache.store(SID, TAG, bytes(MAX_DER + 1))
    assert cache.store(SID, TAG, bytes(MAX_DER))
    assert not cache.store(b"", TAG, b"x") and not cache.store(bytes(33), TAG, b"x")
    assert len(cache._map) == 4 * SLOT_SIZE


def test_a_torn_or_corrupted_slot_is_a_miss() -> None:
    cache = SharedSessionCache(1)
    cache.store(SID, TAG, b"session")
    m = cache._map
    m[0] = m[0] | 1  # a writer is in the middle of this slot
    assert cache.lookup(SID, TAG) is None
    m[0] = m[0] & ~1
    assert cache.lookup(SID, TAG) == b"session"
    m[SLOT_SIZE - 1 - (SLOT_SIZE - 59 - 7)] ^= 0xFF  # a byte of the DER
    assert cache.lookup(SID, TAG) is None


def test_a_session_stored_by_another_process_is_found() -> None:
    cache = SharedSessionCache(64)
    pid = os.fork()
    if pid == 0:  # the child stores and leaves
        os._exit(0 if cache.store(SID, TAG, b"from the child") else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cache.lookup(SID, TAG) == b"from the child"


@pytest.fixture(scope="module")
def cert_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    leaf = trustme.CA().issue_cert("cache.test")
    path = tmp_path_factory.mktemp("cache") / "leaf.pem"
    path.write_bytes(leaf.private_key_and_cert_chain_pem.bytes())
    return path


def _handshake(
    server_ctx: SSL.Context, client_ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> ssl.SSLObject:
    srv = SSL.Connection(server_ctx, None)
    srv.set_accept_state()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(incoming, outgoing, server_hostname="cache.test", session=session)
    for _ in range(10):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        srv.bio_write(outgoing.read())
        try:
            srv.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            incoming.write(srv.bio_read(1 << 16))
        except SSL.WantReadError:
            pass
    data = outgoing.read()
    if data:
        srv.bio_write(data)
        try:
            srv.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            incoming.write(srv.bio_read(1 << 16))  # TLS 1.3: the tickets
        except SSL.WantReadError:
            pass
    srv.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
    return client


@pytest.mark.skipif(not session_cache_supported(), reason="the binding lacks the session callbacks")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_two_contexts_resume_each_others_sessions(cert_file: Path, version: ssl.TLSVersion) -> None:
    """What two workers do: each has its own SSL_CTX (same certificate line), one cache."""
    params = SSLConfigParams.from_records(
        {"proxy.config.ssl.server.session_ticket.enable": 0}, cert_file.parent
    )
    cache = SharedSessionCache(128)
    pair = [CertKeyPair(cert_file, cert_file)]
    contexts = [build_server_context(params, pair, None, None) for _ in range(2)]
    other = build_server_context(params, pair, None, None)
    for ctx in contexts:
        assert cache.attach(ctx, "ssl_multicert.config:1")
    assert cache.attach(other, "ssl_multicert.config:2")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.minimum_version = client_ctx.maximum_version = version
    first = _handshake(contexts[0], client_ctx, None)
    if version is ssl.TLSVersion.TLSv1_3:
        with pytest.raises(ssl.SSLWantReadError):
            first.read(1)  # the stateful ticket arrives after the handshake
    assert first.session is not None and not first.session_reused
    again = _handshake(contexts[1], client_ctx, first.session)
    assert again.session_reused
    # a context for another certificate line does not resume it
    assert not _handshake(other, client_ctx, first.session).session_reused


def test_without_the_session_callbacks_contexts_keep_openssls_cache(
    cert_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback when SSL_CTX_sess_set_*_cb cannot be found: attach answers False,
    configure_session_cache leaves OpenSSL's per-process cache on, and a context still resumes
    its own sessions."""
    from iocore.net.tls import _openssl
    from iocore.net.tls.session_cache import configure_session_cache

    monkeypatch.setattr(_openssl, "HAVE_SESSION_CALLBACKS", False)
    assert not session_cache_supported()
    params = SSLConfigParams.from_records(
        {"proxy.config.ssl.server.session_ticket.enable": 0}, cert_file.parent
    )
    cache = SharedSessionCache(16)
    ctx = build_server_context(params, [CertKeyPair(cert_file, cert_file)], None, None)
    assert not cache.attach(ctx, "ssl_multicert.config:1")
    configure_session_cache(ctx, 2, 60, cache, "ssl_multicert.config:1")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.minimum_version = client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    first = _handshake(ctx, client_ctx, None)
    assert first.session is not None and not first.session_reused
    assert _handshake(ctx, client_ctx, first.session).session_reused

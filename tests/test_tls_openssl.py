"""iocore/net/tls/_openssl.py, the one module with private pyOpenSSL / cryptography access: its
capability probes, and the fallbacks the callers take when a probe fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from iocore.net.tls import _openssl
from iocore.net.tls.context import build_inbound_policy
from iocore.net.tls.errors import TLSError

ROOT = Path(__file__).resolve().parent.parent


def test_versions_and_capabilities_on_this_platform() -> None:
    assert _openssl.PYOPENSSL_VERSION and _openssl.CRYPTOGRAPHY_VERSION
    assert _openssl.OPENSSL_VERSION_NUMBER >= 0x30000000
    if sys.platform.startswith("linux"):  # the _rust symbol table is read on Linux only
        assert _openssl.HAVE_TICKET_KEYS and _openssl.HAVE_NUM_TICKETS
        assert _openssl.HAVE_SESSION_CALLBACKS and _openssl.SSL_POLICY is not None
        assert _openssl.HAVE_SOCKET_BIO or os.environ.get("TSPROXY_TLS_MEMORY_BIO") == "1"


def test_an_unreadable_symbol_table_disables_every_rust_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stripped or foreign _rust module: each probe answers "unsupported", none raises."""
    monkeypatch.setattr(_openssl, "_elf_function_symbols", lambda path, wanted: {})
    _openssl._rust_symbol_table.cache_clear()
    try:
        assert _openssl._rust_symbol_table() is None
        assert _openssl._ctx_ctrl() is None
        assert _openssl._ctx_set_num_tickets() is None
        assert _openssl._socket_bio() is None
        assert _openssl._session_functions() is None
        assert _openssl._policy_functions() is None
    finally:
        _openssl._rust_symbol_table.cache_clear()


def test_anchors_that_disagree_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = _openssl._elf_function_symbols

    def skewed(path: str, wanted: frozenset[str]) -> dict[str, int]:
        syms = real(path, wanted)
        if "_cffi_d_SSL_CTX_set_options" in syms:
            syms["_cffi_d_SSL_CTX_set_options"] += 16
        return syms

    monkeypatch.setattr(_openssl, "_elf_function_symbols", skewed)
    _openssl._rust_symbol_table.cache_clear()
    try:
        assert _openssl._rust_symbol_table() is None
    finally:
        _openssl._rust_symbol_table.cache_clear()


def test_memory_bio_fallback_when_forced() -> None:
    """TSPROXY_TLS_MEMORY_BIO=1 (as when SSL_ctrl / SSL_has_pending are missing): no socket
    BIO, SSL_has_pending answers 0 and set_read_ahead does nothing. The proxy's data path over
    memory BIOs is exercised end to end by test_proxy_http (its ``bio`` parameter)."""
    code = (
        "from OpenSSL import SSL\n"
        "from iocore.net.tls import _openssl as o\n"
        "c = SSL.Connection(SSL.Context(SSL.TLS_SERVER_METHOD), None)\n"
        "o.set_read_ahead(c)\n"
        "assert not o.HAVE_SOCKET_BIO and o.SSL_has_pending(o.ssl_pointer(c)) == 0\n"
        "import iocore.net.tls_data_path as v\n"
        "assert not v._HAVE_SOCKET_BIO\n"
    )
    env = {**os.environ, "TSPROXY_TLS_MEMORY_BIO": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=60)


def test_without_the_policy_functions_sni_policies_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_openssl, "SSL_POLICY", None)
    with pytest.raises(TLSError, match="SSL_ctrl"):
        build_inbound_policy(certification_level=None, ca_file=None, ca_dir=None, versions=None, sid_ctx=b"x")

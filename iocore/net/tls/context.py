# Theory of operation
# -------------------
# This module turns an SSLConfigParams snapshot into OpenSSL SSL_CTX objects (pyOpenSSL
# Contexts), the way ATS's SSLUtils.cc does in SSLInitServerContext / SSLInitClientContext:
#
#   build_server_context  one context per ssl_multicert.config line.  Several cert/key pairs
#                         go into the SAME context: OpenSSL keeps one certificate per key type
#                         and picks the one the client's signature algorithms allow.
#   build_client_context  the context for origin connections.
#   verify_hostname/ip    RFC 6125 name checks, left to the caller after the handshake.
#
# Session resumption across worker processes and reloads.  OpenSSL encrypts session tickets
# with keys it draws at random in SSL_CTX_new, so a ticket issued by one context is garbage
# to any other.  We install the keys explicitly (SSL_CTX_set_tlsext_ticket_keys, which is the
# macro SSL_CTX_ctrl(ctx, SSL_CTRL_SET_TLSEXT_TICKET_KEYS=59, 80, buf)); every context built
# with the same 80 key bytes then decrypts every other's tickets.  The session id context is
# a constant for the same reason (OpenSSL refuses a session whose sid_ctx differs).
#
# pyOpenSSL's cffi binding does not declare SSL_CTX_ctrl nor SSL_CTX_set_num_tickets;
# iocore/net/tls/_openssl.py (which owns every private OpenSSL access) finds them in
# cryptography's _rust module.  Every key installation is read back and compared.  Without
# them (_openssl.HAVE_TICKET_KEYS / HAVE_NUM_TICKETS False: other platform, stripped build)
# contexts keep OpenSSL's own per-context ticket keys (resumption then only works on the same
# context) and a warning is logged once.
#
# Invariants: no OpenSSL exception leaves this module (configuration problems become
# ConfigError naming the file or record, anything else TLSError); every Context is fully
# configured before it is returned (pyOpenSSL forbids changes after first use).
"""OpenSSL contexts for the proxy's server side and origin side."""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from iocore.net.ssl_config import SSLConfigParams, VerifyServerPolicy, VerifyServerProperties
from iocore.net.tls import _openssl
from iocore.net.tls.errors import TLSError
from iocore.records.errors import ConfigError

__all__ = [
    "SESSION_ID_CONTEXT",
    "TICKET_KEY_LEN",
    "CertKeyPair",
    "InboundTLSPolicy",
    "NoApplicationProtocol",
    "build_client_context",
    "build_inbound_policy",
    "build_server_context",
    "load_or_create_ticket_keys",
    "num_tickets_supported",
    "session_reused",
    "ticket_keys_supported",
    "verify_hostname",
    "verify_ip",
    "verify_result",
]

_log = logging.getLogger("tsproxy.ssl")

# OpenSSL's SSL_CTX_set_tlsext_ticket_keys layout: 16 key name + 32 HMAC secret + 32 AES key.
TICKET_KEY_LEN = 80
# ATS's ticket_key.filename layout (ssl_ticket_key_block): 16 name + 16 HMAC + 16 AES per key.
ATS_TICKET_KEY_LEN = 48
SESSION_ID_CONTEXT = b"tsproxy"

_SSL_OP_ALLOW_CLIENT_RENEGOTIATION = 1 << 8  # OpenSSL >= 3.0; not in the binding
# OpenSSL >= 3.0: a TCP EOF without close_notify ends the stream like close_notify instead of
# a fatal "unexpected eof" (which drops the session from the cache), as nginx sets it.
_SSL_OP_IGNORE_UNEXPECTED_EOF = 1 << 7

_PROTOCOLS = (
    ("TLSv1", SSL.TLS1_VERSION, SSL.OP_NO_TLSv1),
    ("TLSv1_1", SSL.TLS1_1_VERSION, SSL.OP_NO_TLSv1_1),
    ("TLSv1_2", SSL.TLS1_2_VERSION, SSL.OP_NO_TLSv1_2),
    ("TLSv1_3", SSL.TLS1_3_VERSION, SSL.OP_NO_TLSv1_3),
)


class NoApplicationProtocol(SSL.Error):
    """Raised by the ALPN select callback when no protocol is in common: pyOpenSSL answers the
    callback with SSL_TLSEXT_ERR_ALERT_FATAL, OpenSSL sends no_application_protocol (RFC 7301
    section 3.2), and the handshake step re-raises this (an SSL.Error, counted like any other
    handshake failure). Here, not in the compiled VC module: its base is a Python class."""


class CertKeyPair(NamedTuple):
    """A certificate chain PEM (leaf first) and the PEM file holding its private key."""

    cert: Path
    key: Path


# --------------------------------------------------------------------------------------
# OpenSSL functions the binding lacks (found by _openssl)
# --------------------------------------------------------------------------------------


def ticket_keys_supported() -> bool:
    """True when build_server_context can install shared session ticket keys."""
    return _openssl.HAVE_TICKET_KEYS


def num_tickets_supported() -> bool:
    """True when the number of TLS 1.3 tickets per handshake can be set."""
    return _openssl.HAVE_NUM_TICKETS


@functools.cache
def _warn_unsupported_once(what: str) -> None:
    _log.warning("%s is not available with this OpenSSL binding; using OpenSSL's default", what)


def _set_ticket_keys(ctx: SSL.Context, keys: bytes) -> bool:
    if not _openssl.HAVE_TICKET_KEYS:
        _warn_unsupported_once("setting session ticket keys")
        return False
    if not _openssl.SSL_CTX_set_tlsext_ticket_keys(ctx, keys):
        raise TLSError("SSL_CTX_set_tlsext_ticket_keys failed or the keys did not read back as installed")
    return True


def _set_num_tickets(ctx: SSL.Context, n: int) -> bool:
    if not _openssl.HAVE_NUM_TICKETS:
        _warn_unsupported_once("SSL_CTX_set_num_tickets")
        return False
    if not _openssl.SSL_CTX_set_num_tickets(ctx, n):
        raise TLSError(f"SSL_CTX_set_num_tickets({n}) failed")
    return True


def load_or_create_ticket_keys(filename: Path | None) -> bytes:
    """The 80 ticket key bytes for build_server_context.

    ``None`` (proxy.config.ssl.server.ticket_key.filename unset): 80 fresh random bytes; pass
    the same bytes to every context of this process and hand them to forked workers so that
    they all share tickets.  A file of exactly 80 bytes is OpenSSL's layout (name, HMAC,
    AES) and used as is.  Otherwise the file must hold ATS's 48-byte keys (16 name, 16 HMAC,
    16 AES), possibly several; the first (ATS's current key) is stretched to OpenSSL's
    layout with HKDF-SHA256, so every proxy reading the same file derives the same keys.
    Older keys in the file are ignored: honouring them needs the ticket key callback, which
    the binding does not offer.  A 240-byte file is read as five ATS keys.
    """
    if filename is None:
        return os.urandom(TICKET_KEY_LEN)
    try:
        data = filename.read_bytes()
    except OSError as exc:
        raise ConfigError(
            str(filename), None, f"cannot read session ticket key file: {exc.strerror}"
        ) from exc
    if len(data) == TICKET_KEY_LEN:
        return data
    if data and len(data) % ATS_TICKET_KEY_LEN == 0:
        first = data[:ATS_TICKET_KEY_LEN]
        secrets = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=b"tsproxy ticket key v1").derive(
            first
        )
        return first[:16] + secrets
    raise ConfigError(
        str(filename),
        None,
        f"session ticket key file is {len(data)} bytes; expected 80 (OpenSSL) or a multiple of 48 (ATS)",
    )


# --------------------------------------------------------------------------------------
# helpers shared by both sides
# --------------------------------------------------------------------------------------


def _openssl_reason(exc: Exception) -> str:
    if isinstance(exc, SSL.Error | crypto.Error) and exc.args and isinstance(exc.args[0], list):
        parts = [str(e[2]) for e in exc.args[0] if isinstance(e, tuple) and len(e) == 3]
        if parts:
            return "; ".join(parts)
    return str(exc) or type(exc).__name__


def _load_verify_locations(ctx: SSL.Context, cafile: Path | None, capath: Path | None) -> None:
    """The trusted CAs from a PEM file and/or a hashed directory; errors name the file."""
    if cafile is not None:
        _check_readable(cafile, "CA certificate file")
    try:
        ctx.load_verify_locations(
            str(cafile).encode() if cafile else None, str(capath).encode() if capath else None
        )
    except SSL.Error as exc:
        raise ConfigError(
            str(cafile or capath), None, f"bad CA certificates: {_openssl_reason(exc)}"
        ) from exc


def _check_readable(path: Path, what: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot read {what}: {exc.strerror}") from exc


def _set_protocols(ctx: SSL.Context, switches: dict[str, bool], side: str) -> None:
    enabled = [(v, no) for name, v, no in _PROTOCOLS if switches[name]]
    if not enabled:
        raise ConfigError("records.config", None, f"every TLS version is disabled for the {side} side")
    ctx.set_min_proto_version(enabled[0][0])
    ctx.set_max_proto_version(enabled[-1][0])
    holes = 0
    for name, version, no in _PROTOCOLS:
        if enabled[0][0] < version < enabled[-1][0] and not switches[name]:
            holes |= no
    if holes:
        ctx.set_options(holes)


def _set_ciphers(ctx: SSL.Context, tls12: str, tls13: str, record_prefix: str) -> None:
    if tls12:
        try:
            ctx.set_cipher_list(tls12.encode())
        except SSL.Error as exc:
            raise ConfigError(
                "records.config", None, f"{record_prefix}.cipher_suite: {_openssl_reason(exc)}: {tls12!r}"
            ) from exc
    if tls13:
        try:
            ctx.set_tls13_ciphersuites(tls13.encode())
        except SSL.Error as exc:
            raise ConfigError(
                "records.config",
                None,
                f"{record_prefix}.TLSv1_3.cipher_suites: {_openssl_reason(exc)}: {tls13!r}",
            ) from exc


def _set_groups(ctx: SSL.Context, groups: str, record: str) -> None:
    """SSL_CTX_set1_groups_list (ATS ``groups_list``): the key-exchange groups, in order."""
    if groups and not _openssl.SSL_CTX_set1_groups_list(ctx, groups.encode()):
        raise ConfigError(
            "records.config",
            None,
            f"{record}: OpenSSL does not accept {groups!r} (an unknown or unsupported group name?)",
        )


def check_groups_list(groups: str, record: str) -> None:
    """Raise ConfigError (without a line) if OpenSSL refuses ``record``'s groups list."""
    _set_groups(SSL.Context(SSL.TLS_METHOD), groups, record)


def _load_private_key(key: Path, passphrase: bytes | None) -> Any:
    """The key from a PEM file (other PEM blocks, e.g. the certificate, are skipped)."""
    try:
        pem = key.read_bytes()
    except OSError as exc:
        raise ConfigError(str(key), None, f"cannot read private key: {exc.strerror}") from exc
    try:
        try:
            return serialization.load_pem_private_key(pem, passphrase)
        except TypeError:
            if passphrase is None:
                raise ConfigError(
                    str(key),
                    None,
                    "private key is encrypted and no passphrase source (ssl_key_dialog) is set",
                ) from None
            return serialization.load_pem_private_key(pem, None)  # not encrypted: passphrase unused
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(str(key), None, f"bad private key (or wrong passphrase): {exc}") from exc


def _load_cert_and_key(ctx: SSL.Context, cert: Path, key: Path, passphrase: bytes | None = None) -> None:
    """Load one chain + key into ctx; OpenSSL files it under the key's type."""
    _check_readable(cert, "certificate")
    pkey = _load_private_key(key, passphrase)
    try:
        ctx.use_certificate_chain_file(str(cert).encode())
    except SSL.Error as exc:
        raise ConfigError(str(cert), None, f"bad certificate chain: {_openssl_reason(exc)}") from exc
    try:
        ctx.use_privatekey(pkey)
        ctx.check_privatekey()
    except (SSL.Error, TypeError) as exc:
        # OpenSSL files the key by type: a key of another type than the cert lands in an
        # empty slot ("no certificate assigned"), one of the same type fails to match.
        raise ConfigError(str(key), None, f"private key does not match certificate {cert}") from exc


def _read_pem_certs(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot read certificates: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(str(path), None, f"no valid PEM certificates: {exc}") from exc


def _ca_dir_certs(path: Path) -> list[x509.Certificate]:
    """Certificates in a CA directory (c_rehash style); unparsable files are skipped."""
    out: list[x509.Certificate] = []
    try:
        entries = sorted(path.iterdir())
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot list CA directory: {exc.strerror}") from exc
    for entry in entries:
        try:
            out.extend(x509.load_pem_x509_certificates(entry.read_bytes()))
        except (OSError, ValueError):
            continue
    return out


# --------------------------------------------------------------------------------------
# server side
# --------------------------------------------------------------------------------------


def build_server_context(
    params: SSLConfigParams,
    certs: Sequence[CertKeyPair],
    ca_chain_file: Path | None,
    ticket_keys: bytes | None,
    *,
    ticket_enabled: bool | None = None,
    ticket_number: int | None = None,
    passphrase: bytes | None = None,
) -> SSL.Context:
    """One server SSL_CTX (ATS SSLInitServerContext) serving ``certs``.

    ``ticket_enabled`` / ``ticket_number`` override the records for one ssl_multicert.config
    line.  ``ticket_keys`` (80 bytes, see load_or_create_ticket_keys) are installed so that
    tickets survive reloads and work across worker processes; None leaves OpenSSL's random
    per-context keys.  ``passphrase`` unlocks encrypted private keys.  An empty ``certs`` gives
    a context with no certificate (ATS's bootstrap default context).
    """
    if ticket_keys is not None and len(ticket_keys) != TICKET_KEY_LEN:
        raise ValueError(f"ticket_keys must be {TICKET_KEY_LEN} bytes, got {len(ticket_keys)}")
    enabled = params.session_ticket_enabled if ticket_enabled is None else ticket_enabled
    number = params.session_ticket_number if ticket_number is None else ticket_number
    try:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        _set_protocols(
            ctx,
            {
                "TLSv1": params.tls_v1,
                "TLSv1_1": params.tls_v1_1,
                "TLSv1_2": params.tls_v1_2,
                "TLSv1_3": params.tls_v1_3,
            },
            "server",
        )
        _set_ciphers(
            ctx, params.server_cipher_suite, params.server_tls13_cipher_suites, "proxy.config.ssl.server"
        )
        _set_groups(ctx, params.server_groups_list, "proxy.config.ssl.server.groups_list")
        options = SSL.OP_NO_COMPRESSION | _SSL_OP_IGNORE_UNEXPECTED_EOF
        if params.honor_cipher_order:
            options |= SSL.OP_CIPHER_SERVER_PREFERENCE
        if params.allow_client_renegotiation:
            options |= _SSL_OP_ALLOW_CLIENT_RENEGOTIATION
        else:
            # CVE-2011-1473: refuse every renegotiation (TLS 1.2 and below).  OpenSSL 3
            # already refuses client-initiated ones unless ALLOW_CLIENT_RENEGOTIATION.
            options |= SSL.OP_NO_RENEGOTIATION
        if not enabled:
            options |= SSL.OP_NO_TICKET
        ctx.set_options(options)
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.set_session_id(SESSION_ID_CONTEXT)
        for pair in certs:
            _load_cert_and_key(ctx, pair.cert, pair.key, passphrase)
        if ca_chain_file is not None:
            for cert in _read_pem_certs(ca_chain_file):
                ctx.add_extra_chain_cert(cert)

        if params.certification_level > 0:
            _setup_client_verification(ctx, params)

        if enabled:
            if ticket_keys is not None:
                _set_ticket_keys(ctx, ticket_keys)
            _set_num_tickets(ctx, number)
        if params.keylog_file is not None:
            ctx.set_keylog_callback(_keylog_writer(params.keylog_file))
        return ctx
    except (SSL.Error, crypto.Error) as exc:
        raise TLSError(f"building server context: {_openssl_reason(exc)}") from exc


def _setup_client_verification(ctx: SSL.Context, params: SSLConfigParams) -> None:
    cafile, capath = params.ca_cert_filename, params.ca_cert_path
    if cafile is None and capath is None:
        raise ConfigError(
            "records.config",
            None,
            f"proxy.config.ssl.client.certification_level={params.certification_level} needs "
            "proxy.config.ssl.CA.cert.filename or proxy.config.ssl.CA.cert.path",
        )
    _load_verify_locations(ctx, cafile, capath)
    names = _read_pem_certs(cafile) if cafile is not None else []
    if capath is not None:
        names += _ca_dir_certs(capath)
    for cert in names:
        ctx.add_client_ca(cert)
    mode = SSL.VERIFY_PEER
    if params.certification_level == 2:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    ctx.set_verify(mode)


def _keylog_writer(path: Path) -> Callable[[SSL.Connection, bytes], None]:
    def write(_conn: SSL.Connection, line: bytes) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line + b"\n")
            finally:
                os.close(fd)
        except OSError as exc:
            _log.debug("keylog %s: %s", path, exc)

    return write


# --------------------------------------------------------------------------------------
# per-connection server policy (sni.yaml items)
# --------------------------------------------------------------------------------------

_ALL_NO_TLS = SSL.OP_NO_TLSv1 | SSL.OP_NO_TLSv1_1 | SSL.OP_NO_TLSv1_2 | SSL.OP_NO_TLSv1_3
TLS_VERSION_NAMES = tuple(name for name, _version, _no in _PROTOCOLS)


class InboundTLSPolicy:
    """What one sni.yaml item changes on the server side of a handshake, made ready at load.

    ``apply`` runs on the new SSL object before OpenSSL has seen a byte of the ClientHello (the
    handshake parses the hello first, so the SNI is known): it costs a handful of C calls, and
    only connections whose name matched such an item pay them. This is ATS's approach
    (TLSValidProtocols, VerifyClient: SSL_set_min/max_proto_version, SSL_set_verify,
    SSL_set1_verify_cert_store, SSL_set_client_CA_list on the connection) rather than one
    context per name and certificate. A policy that asks for client certificates also gets its
    own session id context, so a session resumed from another name (which never asked for a
    certificate) cannot skip the check.
    """

    __slots__ = (
        "_ca_certs",
        "_ca_stack",
        "_ciphers",
        "_fns",
        "_groups",
        "_holes",
        "_max",
        "_min",
        "_sid_ctx",
        "_store",
        "_tls13_ciphers",
        "_verify_mode",
    )

    def __init__(
        self,
        fns: _openssl.SSLPolicyFunctions,
        verify_mode: int | None,
        store: crypto.X509Store | None,
        ca_certs: list[crypto.X509],
        versions: tuple[int, int, int] | None,
        sid_ctx: bytes,
        ciphers: tuple[bytes | None, bytes | None, bytes | None] = (None, None, None),
    ) -> None:
        self._fns = fns
        self._ciphers, self._tls13_ciphers, self._groups = ciphers
        self._verify_mode = verify_mode
        self._store = store
        self._ca_certs = ca_certs  # own the subject names _ca_stack points to
        self._ca_stack: Any = None
        if ca_certs:
            # One stack made here; each connection gets SSL_dup_CA_list of it (one call).
            self._ca_stack = _openssl.x509_name_stack(ca_certs)
        self._min, self._max, self._holes = versions if versions is not None else (0, 0, 0)
        self._sid_ctx = sid_ctx

    def apply(self, conn: SSL.Connection) -> None:
        ssl = _openssl.ssl_pointer(conn)
        fns = self._fns
        if self._min:
            fns.SSL_clear_options(ssl, _ALL_NO_TLS)
            fns.set_min_max_proto_version(ssl, self._min, self._max)
            if self._holes:
                fns.SSL_set_options(ssl, self._holes)
        if self._ciphers is not None:
            fns.SSL_set_cipher_list(ssl, self._ciphers)
        if self._tls13_ciphers is not None:
            fns.SSL_set_ciphersuites(ssl, self._tls13_ciphers)
        if self._groups is not None:
            fns.set1_groups_list(ssl, self._groups)
        mode = self._verify_mode
        if mode is not None:
            fns.SSL_set_verify(ssl, mode, _openssl.NULL)
            store = self._store
            if store is not None:
                fns.set1_verify_cert_store(ssl, store)
            if self._ca_stack is not None:
                fns.SSL_set_client_CA_list(ssl, fns.SSL_dup_CA_list(self._ca_stack))  # takes the copy
            sid = self._sid_ctx
            fns.SSL_set_session_id_context(ssl, sid, len(sid))


def build_inbound_policy(
    *,
    certification_level: int | None,
    ca_file: Path | None,
    ca_dir: Path | None,
    versions: Sequence[str] | None,
    sid_ctx: bytes,
    cipher_suite: str | None = None,
    tls13_cipher_suites: str | None = None,
    groups_list: str | None = None,
) -> InboundTLSPolicy:
    """An InboundTLSPolicy: ``certification_level`` 0/1/2 (None: keep the context's),
    the CAs client certificates must chain to (required for level 1 and 2), ``versions`` the TLS
    versions allowed (names as in TLS_VERSION_NAMES; None: keep the context's). Raises
    ConfigError naming a CA file that cannot be read, TLSError when this OpenSSL binding lacks
    the per-connection functions. ``cipher_suite`` / ``tls13_cipher_suites`` / ``groups_list``
    replace the records' lists (checked here on a scratch connection: ConfigError when OpenSSL
    refuses one)."""
    fns = _openssl.SSL_POLICY
    if fns is None:
        raise TLSError("per-name TLS policy needs SSL_ctrl, which this OpenSSL binding does not expose")
    ciphers = (
        cipher_suite.encode() if cipher_suite else None,
        tls13_cipher_suites.encode() if tls13_cipher_suites else None,
        groups_list.encode() if groups_list else None,
    )
    scratch = _openssl.ssl_pointer(SSL.Connection(SSL.Context(SSL.TLS_SERVER_METHOD), None))
    for key, value in zip(
        ("server_cipher_suite", "server_TLSv1_3_cipher_suites", "server_groups_list"), ciphers, strict=True
    ):
        if value is None:
            continue
        if key == "server_cipher_suite":
            accepted = fns.SSL_set_cipher_list(scratch, value)
        elif key == "server_TLSv1_3_cipher_suites":
            accepted = fns.SSL_set_ciphersuites(scratch, value)
        else:
            accepted = fns.set1_groups_list(scratch, value)
        if accepted != 1:
            _openssl.ERR_clear_error()
            raise ConfigError("", None, f"{key}: OpenSSL does not accept {value.decode()!r}")
    verify_mode: int | None = None
    store: crypto.X509Store | None = None
    ca_certs: list[crypto.X509] = []
    if certification_level is not None:
        verify_mode = SSL.VERIFY_NONE
        if certification_level > 0:
            if ca_file is None and ca_dir is None:
                raise ConfigError("", None, "client certificates need CA certificates to verify them")
            verify_mode = SSL.VERIFY_PEER
            if certification_level == 2:
                verify_mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            if ca_file is not None:
                _check_readable(ca_file, "CA certificate file")
            store = crypto.X509Store()
            try:
                store.load_locations(ca_file, ca_dir)
            except crypto.Error as exc:
                raise ConfigError(
                    str(ca_file or ca_dir), None, f"bad CA certificates: {_openssl_reason(exc)}"
                ) from exc
            certs = _read_pem_certs(ca_file) if ca_file is not None else []
            if ca_dir is not None:
                certs += _ca_dir_certs(ca_dir)
            ca_certs = [crypto.X509.from_cryptography(c) for c in certs]
    span: tuple[int, int, int] | None = None
    if versions is not None:
        enabled = [(v, no) for name, v, no in _PROTOCOLS if name in versions]
        if not enabled:
            raise ConfigError("", None, "no TLS version left")
        lo, hi = enabled[0][0], enabled[-1][0]
        holes = 0
        for name, version, no in _PROTOCOLS:
            if lo < version < hi and name not in versions:
                holes |= no
        span = (lo, hi, holes)
    return InboundTLSPolicy(fns, verify_mode, store, ca_certs, span, sid_ctx[:32], ciphers)


# --------------------------------------------------------------------------------------
# client side (origin connections)
# --------------------------------------------------------------------------------------


def build_client_context(params: SSLConfigParams, *, alpn_protocols: Sequence[bytes] = ()) -> SSL.Context:
    """The origin-side SSL_CTX (ATS SSLInitClientContext).

    With policy ENFORCED and properties SIGNATURE or ALL the context is VERIFY_PEER: a chain
    that does not verify fails the handshake.  With PERMISSIVE, or properties NONE/NAME, it
    is VERIFY_NONE: OpenSSL still verifies the chain, the handshake goes on, and the caller
    reads verify_result(conn) to log (PERMISSIVE) the failure.  The host
    name is never checked here: the caller runs verify_hostname / verify_ip on the peer
    certificate, because only it knows which name the policy (sni_policy) wants.
    """
    try:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        _set_protocols(
            ctx,
            {
                "TLSv1": params.client_tls_v1,
                "TLSv1_1": params.client_tls_v1_1,
                "TLSv1_2": params.client_tls_v1_2,
                "TLSv1_3": params.client_tls_v1_3,
            },
            "client",
        )
        _set_ciphers(
            ctx, params.client_cipher_suite, params.client_tls13_cipher_suites, "proxy.config.ssl.client"
        )
        _set_groups(ctx, params.client_groups_list, "proxy.config.ssl.client.groups_list")
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)

        cafile, capath = params.client_ca_cert_filename, params.client_ca_cert_path
        if cafile is None and capath is None:
            ctx.set_default_verify_paths()
        else:
            _load_verify_locations(ctx, cafile, capath)
        ctx.set_verify_depth(params.client_verify_depth)

        policy, props = params.client_verify_policy, params.client_verify_properties
        if policy is VerifyServerPolicy.DISABLED:
            ctx.set_verify(SSL.VERIFY_NONE)
        elif policy is VerifyServerPolicy.ENFORCED and props in (
            VerifyServerProperties.SIGNATURE,
            VerifyServerProperties.ALL,
        ):
            ctx.set_verify(SSL.VERIFY_PEER)
        else:
            # OpenSSL verifies the chain anyway and keeps the result for verify_result();
            # a pyOpenSSL callback that accepted would reset that result to X509_V_OK.
            ctx.set_verify(SSL.VERIFY_NONE)

        if params.client_cert_filename is not None:
            key = params.client_private_key_filename or params.client_cert_filename
            _load_cert_and_key(ctx, params.client_cert_filename, key)
        if alpn_protocols:
            ctx.set_alpn_protos(list(alpn_protocols))
        return ctx
    except (SSL.Error, crypto.Error) as exc:
        raise TLSError(f"building client context: {_openssl_reason(exc)}") from exc


def session_reused(conn: SSL.Connection) -> bool:
    """SSL_session_reused: did this handshake resume a session (pyOpenSSL has no method)?"""
    return _openssl.SSL_session_reused(conn)


def verify_result(conn: SSL.Connection) -> tuple[int, str]:
    """SSL_get_verify_result and its text: (0, "ok") when the peer chain verified."""
    return _openssl.SSL_get_verify_result(conn)


# --------------------------------------------------------------------------------------
# RFC 6125 name checks
# --------------------------------------------------------------------------------------


def _as_cryptography(cert: crypto.X509 | x509.Certificate) -> x509.Certificate:
    return cert.to_cryptography() if isinstance(cert, crypto.X509) else cert


def _normalise_dns(name: str) -> str | None:
    name = name.strip().rstrip(".").lower()
    if not name:
        return None
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return name


def _dns_matches(pattern: str, name: str) -> bool:
    """RFC 6125 6.4.3: only a whole leftmost ``*`` label, matching exactly one label."""
    pat = _normalise_dns(pattern)
    if pat is None:
        return False
    if "*" not in pat:
        return pat == name
    first, _, rest = pat.partition(".")
    if first != "*" or "*" in rest or "." not in rest:
        return False  # partial (f*.a.com), non-leftmost, or too broad (*.com)
    head, _, tail = name.partition(".")
    return bool(head) and tail == rest


def _dns_sans(cert: x509.Certificate) -> list[str] | None:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    return ext.value.get_values_for_type(x509.DNSName)


def _ip_sans(cert: x509.Certificate) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    values = ext.value.get_values_for_type(x509.IPAddress)
    return [ip for ip in values if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)]


def verify_hostname(cert: crypto.X509 | x509.Certificate, name: str) -> bool:
    """Does ``cert`` name the DNS host ``name``?  DNS SANs, else (no DNS SAN at all) the CN."""
    c = _as_cryptography(cert)
    host = _normalise_dns(name)
    if host is None:
        return False
    try:
        ipaddress.ip_address(host)
        return False  # an IP literal is checked with verify_ip, never against DNS names
    except ValueError:
        pass
    dns = _dns_sans(c)
    if dns:
        return any(_dns_matches(p, host) for p in dns)
    cns = [a.value for a in c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return any(isinstance(cn, str) and _dns_matches(cn, host) for cn in cns)


def verify_ip(cert: crypto.X509 | x509.Certificate, ip: str) -> bool:
    """Does ``cert`` carry an IP address SAN equal to ``ip``?  (The CN is never used.)"""
    try:
        addr = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        return False
    return addr in _ip_sans(_as_cryptography(cert))

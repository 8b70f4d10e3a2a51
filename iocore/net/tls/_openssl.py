"""Every private pyOpenSSL / cryptography access of tsproxy, in one place.

Theory of operation
-------------------
pyOpenSSL's public API is too slow for the TLS data path and lacks a dozen OpenSSL calls the
proxy needs. This module is the only one that reaches behind it (tests/test_architecture.py
enforces that): it imports ``OpenSSL._util``, reads the private attributes of pyOpenSSL's
objects, calls binding (``lib``/``ffi``) functions, and reads the ELF symbol table of
cryptography's ``_rust`` module. Everyone else imports the small functions and names below.

Checked against pyOpenSSL 24.x-25.x and cryptography 42.x-45.x (OpenSSL 3.x statically
linked into ``_rust``) on Linux x86-64 and aarch64. Each capability is probed once, at import;
a missing *required* one fails the import with a message naming it (better than a handshake
failing later), a missing *optional* one sets its ``HAVE_*`` flag False and the callers take
the fallback named below.

Private accesses, why, and what happens without them:

``OpenSSL._util.lib`` / ``ffi`` (required)
    The cffi binding. The data path calls SSL_read / SSL_write / SSL_do_handshake /
    SSL_get_error / SSL_pending / BIO_read / BIO_write / BIO_get_mem_data directly (bound
    below to module names: a direct C function reference per record, no Python wrapper),
    into per-thread scratch buffers (``ffi_new``), because pyOpenSSL's recv/send allocate a
    buffer per call and raise WantReadError at the end of every read. Also SSL_set_fd (the
    socket BIO), SSL_session_reused, SSL_get_verify_result, SSL_CTX_set1_curves_list (groups,
    no public API), the session cache mode/timeout, i2d/d2i_SSL_SESSION.
``Connection._ssl`` / ``_into_ssl`` / ``_from_ssl``, ``Context._context`` (required)
    The SSL*, its read and write memory BIOs, and the SSL_CTX* those calls take
    (``ssl_pointer``, ``read_bio``, ``write_bio``, ``ctx_pointer``: C attrgetters).
``Connection._raise_ssl_error`` / ``_handle_bio_errors`` (required)
    pyOpenSSL's mapping of an SSL_get_error / BIO result to its exceptions (and the clearing
    of OpenSSL's error queue), so errors look exactly as with the public API.
``X509._x509``, ``X509Store._store`` (required for sni.yaml client-certificate policies)
    The X509* / X509_STORE* a per-connection policy hands to SSL_set_client_CA_list and
    SSL_set1_verify_cert_store.
``Connection._reverse_mapping``, ``Context._keylog_callback`` (optional: HAVE_REVERSE_MAPPING)
    pyOpenSSL's class-wide SSL* -> Connection map, only needed by callbacks. A connection on
    the socket BIO without a key log callback leaves it (~150 bytes a connection). Without:
    the entry stays until the connection is freed; nothing else changes.
``cryptography.hazmat.bindings._rust`` ELF ``.symtab`` (optional)
    The binding does not declare, and the shared object does not export, SSL_CTX_ctrl,
    SSL_CTX_set_num_tickets, SSL_ctrl, SSL_has_pending, the SSL_CTX_sess_set_*_cb setters,
    SSL_SESSION_get_id, SSL_get_SSL_CTX, SSL_clear_options, SSL_dup_CA_list,
    SSL_set_cipher_list, SSL_set_ciphersuites, SSL_set_client_CA_list and
    SSL_set_session_id_context. The object is not stripped: ``_rust_symbol_table`` reads its
    symbol table and finds the load address by anchoring on two cffi wrappers whose addresses
    the binding does give (``_cffi_d_SSL_CTX_set_session_id_context``,
    ``_cffi_d_SSL_CTX_set_options``; both anchors must agree). Only on Linux, OpenSSL >= 1.1.1.
    What each group gives, and the fallback without it:

    HAVE_TICKET_KEYS  SSL_CTX_ctrl(SET/GET_TLSEXT_TICKET_KEYS) through ctypes: shared session
                      ticket keys. Without: OpenSSL's random per-context keys (resumption only
                      on the same context) and a warning (context.py).
    HAVE_NUM_TICKETS  SSL_CTX_set_num_tickets. Without: OpenSSL's default (2) and a warning.
    HAVE_SOCKET_BIO   SSL_ctrl(SET_READ_AHEAD) and SSL_has_pending: after the handshake
                      OpenSSL reads and writes the socket itself. Without (or with
                      ``TSPROXY_TLS_MEMORY_BIO=1``): connections keep their memory BIOs,
                      slower but otherwise the same; ``SSL_has_pending`` is then a function
                      answering 0 and ``set_read_ahead`` does nothing.
    HAVE_SESSION_CALLBACKS  the external session cache (session_cache.py). Without:
                      ``SharedSessionCache.attach`` answers False and contexts keep
                      OpenSSL's per-process cache.
    SSL_POLICY        (None when missing) the per-connection sni.yaml policy functions.
                      Without: build_inbound_policy raises TLSError, sni.yaml loading reports
                      the item as unsupported.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import operator
import os
import struct
import sys
import warnings
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, NamedTuple

import cryptography
import OpenSSL
from OpenSSL import SSL, crypto

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError as _exc:  # pragma: no cover - every pyOpenSSL since 0.14 has it
    raise ImportError(f"tsproxy needs pyOpenSSL's cffi binding (OpenSSL._util): {_exc}") from _exc

__all__ = [
    "CRYPTOGRAPHY_VERSION",
    "HAVE_NUM_TICKETS",
    "HAVE_REVERSE_MAPPING",
    "HAVE_SESSION_CALLBACKS",
    "HAVE_SOCKET_BIO",
    "HAVE_TICKET_KEYS",
    "OPENSSL_VERSION_NUMBER",
    "PYOPENSSL_VERSION",
    "SSL_POLICY",
]

_log = logging.getLogger("tsproxy.ssl")

PYOPENSSL_VERSION: str = OpenSSL.__version__
CRYPTOGRAPHY_VERSION: str = cryptography.__version__

# --------------------------------------------------------------------------------------
# required: the binding functions and pyOpenSSL attributes (checked at import)
# --------------------------------------------------------------------------------------

_REQUIRED_LIB = (
    "OpenSSL_version_num",
    "SSL_read",
    "SSL_write",
    "SSL_pending",
    "SSL_get_error",
    "SSL_do_handshake",
    "SSL_set_fd",
    "SSL_session_reused",
    "SSL_get_verify_result",
    "X509_verify_cert_error_string",
    "SSL_CTX_set1_curves_list",
    "SSL_CTX_set_session_cache_mode",
    "SSL_CTX_set_timeout",
    "SSL_version",
    "SSL_get_options",
    "SSL_set_options",
    "SSL_set_verify",
    "i2d_SSL_SESSION",
    "d2i_SSL_SESSION",
    "ERR_clear_error",
    "BIO_read",
    "BIO_write",
    "BIO_get_mem_data",
    "sk_X509_NAME_new_null",
    "sk_X509_NAME_push",
    "sk_X509_NAME_free",
    "X509_get_subject_name",
)


def _check_required() -> None:
    missing = [name for name in _REQUIRED_LIB if not hasattr(_lib, name)]
    ctx = SSL.Context(SSL.TLS_METHOD)
    conn = SSL.Connection(ctx, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # crypto.X509() is deprecated in some pyOpenSSL versions
        cert = crypto.X509()
    for obj, attr in (
        (ctx, "_context"),
        (conn, "_ssl"),
        (conn, "_into_ssl"),
        (conn, "_from_ssl"),
        (conn, "_context"),
        (conn, "_raise_ssl_error"),
        (conn, "_handle_bio_errors"),
        (cert, "_x509"),
        (crypto.X509Store(), "_store"),
    ):
        if not hasattr(obj, attr):
            missing.append(f"{type(obj).__name__}.{attr}")
    if missing:
        raise ImportError(
            f"pyOpenSSL {PYOPENSSL_VERSION} / cryptography {CRYPTOGRAPHY_VERSION} lack what tsproxy "
            f"needs: {', '.join(missing)}"
        )


_check_required()

OPENSSL_VERSION_NUMBER: int = int(_lib.OpenSSL_version_num())

# -- the data path: direct C function references (one call per record) -------------------------
NULL: Any = _ffi.NULL
ffi_new: Callable[..., Any] = _ffi.new
ffi_buffer: Callable[..., Any] = _ffi.buffer
ffi_from_buffer: Callable[..., Any] = _ffi.from_buffer
SSL_read: Callable[[Any, Any, int], int] = _lib.SSL_read
SSL_write: Callable[[Any, Any, int], int] = _lib.SSL_write
SSL_pending: Callable[[Any], int] = _lib.SSL_pending
SSL_get_error: Callable[[Any, int], int] = _lib.SSL_get_error
SSL_do_handshake: Callable[[Any], int] = _lib.SSL_do_handshake
BIO_read: Callable[[Any, Any, int], int] = _lib.BIO_read
BIO_write: Callable[[Any, Any, int], int] = _lib.BIO_write
BIO_get_mem_data: Callable[[Any, Any], int] = _lib.BIO_get_mem_data
SSL_ERROR_WANT_READ: int = int(_lib.SSL_ERROR_WANT_READ)
SSL_ERROR_WANT_WRITE: int = int(_lib.SSL_ERROR_WANT_WRITE)
SSL_ERROR_ZERO_RETURN: int = int(_lib.SSL_ERROR_ZERO_RETURN)

# -- pyOpenSSL's private attributes: C attrgetters (as cheap as the attribute read) -------------
ssl_pointer: Callable[[SSL.Connection], Any] = operator.attrgetter("_ssl")  # SSL *
read_bio: Callable[[SSL.Connection], Any] = operator.attrgetter("_into_ssl")  # rbio (memory BIO)
write_bio: Callable[[SSL.Connection], Any] = operator.attrgetter("_from_ssl")  # wbio (memory BIO)
ctx_pointer: Callable[[SSL.Context], Any] = operator.attrgetter("_context")  # SSL_CTX *


def raise_ssl_error(conn: SSL.Connection, ssl: Any, result: int) -> None:
    """pyOpenSSL's exception for ``result`` of an SSL_* call on ``ssl`` (Connection._raise_ssl_error);
    returns only for SSL_ERROR_NONE."""
    conn._raise_ssl_error(ssl, result)


def handle_bio_errors(conn: SSL.Connection, bio: Any, result: int) -> None:
    """pyOpenSSL's exception for a failed BIO_read / BIO_write (Connection._handle_bio_errors)."""
    conn._handle_bio_errors(bio, result)


def ctx_address(ctx: SSL.Context) -> int:
    """The SSL_CTX * of ``ctx`` as an integer (a key that also matches SSL_get_SSL_CTX)."""
    return int(_ffi.cast("uintptr_t", ctx._context))


def _address(p: Any) -> int:
    return int(_ffi.cast("uintptr_t", p))


def ERR_clear_error() -> None:
    _lib.ERR_clear_error()


def SSL_session_reused(conn: SSL.Connection) -> bool:
    return bool(_lib.SSL_session_reused(conn._ssl))


def SSL_get_verify_result(conn: SSL.Connection) -> tuple[int, str]:
    """The verify result code and X509_verify_cert_error_string of it."""
    code = int(_lib.SSL_get_verify_result(conn._ssl))
    return code, _ffi.string(_lib.X509_verify_cert_error_string(code)).decode("ascii", "replace")


def SSL_CTX_set1_groups_list(ctx: SSL.Context, groups: bytes) -> bool:
    """SSL_CTX_set1_groups_list (the binding's SSL_CTX_set1_curves_list, the same ctrl); on
    failure OpenSSL's error queue is cleared."""
    if _lib.SSL_CTX_set1_curves_list(ctx._context, groups) == 1:
        return True
    _lib.ERR_clear_error()
    return False


def SSL_set_fd(conn: SSL.Connection, fd: int) -> bool:
    """SSL_set_fd on a memory-BIO connection: OpenSSL frees both memory BIOs and reads and writes
    ``fd`` itself from now on; pyOpenSSL's bookkeeping follows (no memory BIOs, and the
    connection leaves the reverse map when nothing can call back any more). False: unchanged."""
    if _lib.SSL_set_fd(conn._ssl, fd) != 1:
        return False
    conn._into_ssl = conn._from_ssl = None  # pyOpenSSL: a socket-backed connection from now on
    if HAVE_REVERSE_MAPPING and getattr(conn._context, "_keylog_callback", None) is None:
        # pyOpenSSL finds the Connection of an SSL* for its callbacks in a class-wide weak
        # map (~150 bytes an entry). Its callbacks (ALPN, SNI, verify) are handshake-time;
        # the one that may still fire is the key log's, on a TLS 1.3 KeyUpdate, so only a
        # connection without one leaves the map.
        SSL.Connection._reverse_mapping.pop(conn._ssl, None)
    return True


HAVE_REVERSE_MAPPING: bool = isinstance(getattr(SSL.Connection, "_reverse_mapping", None), MutableMapping)

# --------------------------------------------------------------------------------------
# session cache (session_cache.py)
# --------------------------------------------------------------------------------------

SSL_SESS_CACHE_OFF: int = int(_lib.SSL_SESS_CACHE_OFF)
SSL_SESS_CACHE_SERVER: int = int(_lib.SSL_SESS_CACHE_SERVER)
SSL_SESS_CACHE_NO_INTERNAL: int = int(_lib.SSL_SESS_CACHE_NO_INTERNAL)
_OP_NO_TICKET = int(_lib.SSL_OP_NO_TICKET)
_TLS1_3_VERSION = int(_lib.TLS1_3_VERSION)


def SSL_CTX_set_session_cache_mode(ctx: SSL.Context, mode: int) -> None:
    _lib.SSL_CTX_set_session_cache_mode(ctx._context, mode)


def SSL_CTX_set_timeout(ctx: SSL.Context, seconds: int) -> None:
    _lib.SSL_CTX_set_timeout(ctx._context, seconds)


# --------------------------------------------------------------------------------------
# functions found in cryptography's _rust module
# --------------------------------------------------------------------------------------


def _elf_function_symbols(path: str, wanted: frozenset[str]) -> dict[str, int]:
    """st_value of the wanted FUNC symbols in an ELF64 little-endian file's .symtab."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found: dict[str, int] = {}
    wanted_b = {w.encode(): w for w in wanted}
    for sec in sections:
        if sec[1] != 2:  # SHT_SYMTAB
            continue
        str_off = sections[sec[6]][4]
        off, size, entsize = sec[4], sec[5], sec[9]
        for i in range(size // entsize):
            st_name, st_info, _other, shndx, value, _size = struct.unpack_from(
                "<IBBHQQ", data, off + i * entsize
            )
            if st_info & 0xF != 2 or shndx == 0 or value == 0:  # STT_FUNC, defined
                continue
            start = str_off + st_name
            name = data[start : data.index(b"\0", start)]
            if name in wanted_b:
                found[wanted_b[name]] = value
    return found


# The functions looked up in cryptography's _rust module (one read of its symbol table).
_RUST_FUNCTIONS = frozenset(
    {
        "SSL_CTX_ctrl",
        "SSL_CTX_set_num_tickets",
        "SSL_ctrl",
        "SSL_has_pending",
        # the external session cache
        "SSL_CTX_sess_set_new_cb",
        "SSL_CTX_sess_set_get_cb",
        "SSL_CTX_sess_set_remove_cb",
        "SSL_SESSION_get_id",
        "SSL_get_SSL_CTX",
        # per-connection policy (sni.yaml, InboundTLSPolicy)
        "SSL_clear_options",
        "SSL_dup_CA_list",
        "SSL_set_cipher_list",
        "SSL_set_ciphersuites",
        "SSL_set_client_CA_list",
        "SSL_set_session_id_context",
    }
)


@functools.cache
def _rust_symbol_table() -> dict[str, int] | None:
    """Absolute addresses of those of _RUST_FUNCTIONS found inside cryptography's _rust module,
    None when the module cannot be read this way (other platform, stripped, anchors disagree)."""
    try:
        from cryptography.hazmat.bindings import _rust

        if not sys.platform.startswith("linux") or OPENSSL_VERSION_NUMBER < 0x10101000:
            return None
        anchors = ("SSL_CTX_set_session_id_context", "SSL_CTX_set_options")
        anchor_syms = {f"_cffi_d_{a}" for a in anchors}
        syms = _elf_function_symbols(str(_rust.__file__), _RUST_FUNCTIONS | anchor_syms)
        if not anchor_syms <= syms.keys():
            return None
        bases = {_address(_ffi.cast("void *", getattr(_lib, a))) - syms[f"_cffi_d_{a}"] for a in anchors}
        if len(bases) != 1:
            return None
        (base,) = bases
        return {name: base + syms[name] for name in _RUST_FUNCTIONS if name in syms}
    except (OSError, ValueError, ImportError, AttributeError, struct.error, IndexError):
        return None


def _rust_symbols(*names: str) -> dict[str, int] | None:
    """Addresses of the named functions (a subset of _RUST_FUNCTIONS), None unless all found."""
    table = _rust_symbol_table()
    if table is None or not set(names) <= table.keys():
        return None
    return {name: table[name] for name in names}


# -- session ticket keys and count (context set-up only: ctypes) -------------------------------

_SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
_CtrlFn = Callable[[int, int, int, Any], int]


def _ctx_ctrl() -> _CtrlFn | None:
    addrs = _rust_symbols("SSL_CTX_ctrl")
    if addrs is None:
        return None
    fn: _CtrlFn = ctypes.CFUNCTYPE(
        ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p
    )(addrs["SSL_CTX_ctrl"])
    return fn


def _ctx_set_num_tickets() -> Callable[[int, int], int] | None:
    addrs = _rust_symbols("SSL_CTX_set_num_tickets")
    if addrs is None:
        return None
    fn: Callable[[int, int], int] = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)(
        addrs["SSL_CTX_set_num_tickets"]
    )
    return fn


_SSL_CTX_ctrl = _ctx_ctrl()
_SSL_CTX_set_num_tickets = _ctx_set_num_tickets()
HAVE_TICKET_KEYS: bool = _SSL_CTX_ctrl is not None
HAVE_NUM_TICKETS: bool = _SSL_CTX_set_num_tickets is not None


def SSL_CTX_set_tlsext_ticket_keys(ctx: SSL.Context, keys: bytes) -> bool:
    """Install the 80 ticket key bytes and read them back; True when they read back as
    installed. Callers check HAVE_TICKET_KEYS first (raises RuntimeError without)."""
    ctrl = _SSL_CTX_ctrl
    if ctrl is None:
        raise RuntimeError("SSL_CTX_ctrl is not available (HAVE_TICKET_KEYS is False)")
    ptr = ctx_address(ctx)
    n = len(keys)
    buf = ctypes.create_string_buffer(keys, n)
    if ctrl(ptr, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, n, buf) != 1:
        return False
    back = ctypes.create_string_buffer(n)
    return ctrl(ptr, _SSL_CTRL_GET_TLSEXT_TICKET_KEYS, n, back) == 1 and back.raw == keys


def SSL_CTX_set_num_tickets(ctx: SSL.Context, n: int) -> bool:
    """True when OpenSSL accepted ``n``. Callers check HAVE_NUM_TICKETS first."""
    fn = _SSL_CTX_set_num_tickets
    if fn is None:
        raise RuntimeError("SSL_CTX_set_num_tickets is not available (HAVE_NUM_TICKETS is False)")
    return fn(ctx_address(ctx), n) == 1


# -- the socket BIO data path: cffi function pointers (called per record) ----------------------

_SSL_CTRL_SET_READ_AHEAD = 41


def _no_pending(ssl: Any) -> int:
    return 0


def _socket_bio() -> tuple[Any, Any] | None:
    if os.environ.get("TSPROXY_TLS_MEMORY_BIO") == "1":
        return None  # forced: compare the two data paths
    addrs = _rust_symbols("SSL_ctrl", "SSL_has_pending")
    if addrs is None:
        _log.warning(
            "SSL_ctrl / SSL_has_pending not found in this OpenSSL binding: TLS connections keep "
            "their memory BIOs after the handshake (correct, but slower)"
        )
        return None
    return (
        _ffi.cast("long (*)(SSL *, int, long, void *)", addrs["SSL_ctrl"]),
        _ffi.cast("int (*)(const SSL *)", addrs["SSL_has_pending"]),
    )


_socket_bio_fns = _socket_bio()
HAVE_SOCKET_BIO: bool = _socket_bio_fns is not None
# SSL_has_pending(SSL *): record bytes, whole or partial, already read from the socket and still
# buffered in OpenSSL (a cffi function pointer). Without it read-ahead stays off and this answers
# 0, so SSL_pending suffices.
SSL_has_pending: Callable[[Any], int] = _socket_bio_fns[1] if _socket_bio_fns is not None else _no_pending
_SSL_ctrl_read_ahead: Any = _socket_bio_fns[0] if _socket_bio_fns is not None else None


def set_read_ahead(conn: SSL.Connection) -> None:
    """SSL_set_read_ahead(ssl, 1), before the handshake: OpenSSL >= 3.2 hands the setting to a
    record layer when it creates one, and without it every record costs two read(2) calls
    (header, then body). Does nothing without HAVE_SOCKET_BIO."""
    ctrl = _SSL_ctrl_read_ahead
    if ctrl is not None:
        ctrl(conn._ssl, _SSL_CTRL_SET_READ_AHEAD, 1, NULL)


# -- the external session cache -----------------------------------------------------------------


def _session_functions() -> tuple[Any, Any, Any, Any, Any] | None:
    addrs = _rust_symbols(
        "SSL_CTX_sess_set_new_cb",
        "SSL_CTX_sess_set_get_cb",
        "SSL_CTX_sess_set_remove_cb",
        "SSL_SESSION_get_id",
        "SSL_get_SSL_CTX",
    )
    if addrs is None:
        return None
    cast = _ffi.cast
    return (
        cast("void (*)(SSL_CTX *, int (*)(SSL *, SSL_SESSION *))", addrs["SSL_CTX_sess_set_new_cb"]),
        cast(
            "void (*)(SSL_CTX *, SSL_SESSION *(*)(SSL *, const unsigned char *, int, int *))",
            addrs["SSL_CTX_sess_set_get_cb"],
        ),
        cast("void (*)(SSL_CTX *, void (*)(SSL_CTX *, SSL_SESSION *))", addrs["SSL_CTX_sess_set_remove_cb"]),
        cast("const unsigned char *(*)(const SSL_SESSION *, unsigned int *)", addrs["SSL_SESSION_get_id"]),
        cast("SSL_CTX *(*)(const SSL *)", addrs["SSL_get_SSL_CTX"]),
    )


_session_fns = _session_functions()
HAVE_SESSION_CALLBACKS: bool = _session_fns is not None


class SessionCallbacks:
    """OpenSSL's external session cache callbacks (SSL_CTX_sess_set_new_cb / _get_cb /
    _remove_cb) around three Python functions that see only bytes:

    ``on_new(ctx_address, session_id, der)`` a new session to store (TLS 1.3 stateless tickets,
    the default, are not passed: the client resumes from the ticket itself);
    ``on_get(ctx_address, session_id) -> der | None``; ``on_remove(session_id)``.

    ``ctx_address`` is ctx_address() of the context the connection uses. The C callbacks run
    inside SSL_do_handshake and never raise (a failure is a miss). Make one per cache: they must
    outlive every context using them. Requires HAVE_SESSION_CALLBACKS.
    """

    def __init__(
        self,
        on_new: Callable[[int, bytes, bytes], None],
        on_get: Callable[[int, bytes], bytes | None],
        on_remove: Callable[[bytes], None],
    ) -> None:
        if _session_fns is None:
            raise RuntimeError("the session cache callbacks are not available (HAVE_SESSION_CALLBACKS)")
        self._fns = _session_fns
        self._on_new, self._on_get, self._on_remove = on_new, on_get, on_remove
        self._new_cb = _ffi.callback("int (*)(SSL *, SSL_SESSION *)", self._new)
        self._get_cb = _ffi.callback("SSL_SESSION *(*)(SSL *, const unsigned char *, int, int *)", self._get)
        self._remove_cb = _ffi.callback("void (*)(SSL_CTX *, SSL_SESSION *)", self._remove)

    def install(self, ctx: SSL.Context, timeout: int) -> None:
        """OpenSSL's internal cache off, this one on, sessions living ``timeout`` seconds."""
        set_new, set_get, set_remove = self._fns[:3]
        raw = ctx._context
        _lib.SSL_CTX_set_session_cache_mode(raw, SSL_SESS_CACHE_SERVER | SSL_SESS_CACHE_NO_INTERNAL)
        _lib.SSL_CTX_set_timeout(raw, timeout)
        set_new(raw, self._new_cb)
        set_get(raw, self._get_cb)
        set_remove(raw, self._remove_cb)

    def _session_id(self, sess: Any) -> bytes:
        n = _ffi.new("unsigned int *")
        p = self._fns[3](sess, n)
        return bytes(_ffi.buffer(p, n[0])) if n[0] else b""

    def _new(self, ssl: Any, sess: Any) -> int:
        try:
            if _lib.SSL_version(ssl) == _TLS1_3_VERSION and not _lib.SSL_get_options(ssl) & _OP_NO_TICKET:
                return 0  # a stateless ticket: the client resumes from the ticket itself
            n = _lib.i2d_SSL_SESSION(sess, _ffi.NULL)
            if n <= 0:
                return 0
            buf = _ffi.new("unsigned char[]", n)
            pp = _ffi.new("unsigned char **", buf)
            if _lib.i2d_SSL_SESSION(sess, pp) != n:
                return 0
            self._on_new(_address(self._fns[4](ssl)), self._session_id(sess), bytes(_ffi.buffer(buf, n)))
        except Exception:
            pass
        return 0  # OpenSSL keeps its own reference

    def _get(self, ssl: Any, data: Any, length: int, copy: Any) -> Any:
        try:
            copy[0] = 0  # the returned session is OpenSSL's to free
            der = self._on_get(_address(self._fns[4](ssl)), bytes(_ffi.buffer(data, length)))
            if der is None:
                return _ffi.NULL
            buf = _ffi.new("unsigned char[]", der)
            pp = _ffi.new("unsigned char **", buf)
            sess = _lib.d2i_SSL_SESSION(_ffi.NULL, pp, len(der))
            if sess == _ffi.NULL:
                _lib.ERR_clear_error()
            return sess
        except Exception:
            return _ffi.NULL

    def _remove(self, ctx: Any, sess: Any) -> None:
        try:
            self._on_remove(self._session_id(sess))
        except Exception:
            pass


# -- per-connection policy (sni.yaml items: context.InboundTLSPolicy) ----------------------------

_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_CTRL_SET_VERIFY_CERT_STORE = 106
_SSL_CTRL_SET_MIN_PROTO_VERSION = 123
_SSL_CTRL_SET_MAX_PROTO_VERSION = 124


class SSLPolicyFunctions(NamedTuple):
    """The per-connection calls an sni.yaml policy makes on an SSL * (ssl_pointer(conn)).
    cffi function pointers; the ``SSL_CTRL_*`` helpers below wrap the SSL_ctrl macros."""

    SSL_ctrl: Any  # long SSL_ctrl(SSL *, int, long, void *)
    SSL_clear_options: Any  # uint64_t SSL_clear_options(SSL *, uint64_t)
    SSL_set_options: Any  # uint64_t SSL_set_options(SSL *, uint64_t)
    SSL_set_verify: Any  # void SSL_set_verify(SSL *, int, NULL)
    SSL_set_client_CA_list: Any  # void SSL_set_client_CA_list(SSL *, STACK_OF(X509_NAME) *)
    SSL_dup_CA_list: Any  # STACK_OF(X509_NAME) *SSL_dup_CA_list(const STACK_OF(X509_NAME) *)
    SSL_set_session_id_context: Any  # int (SSL *, const unsigned char *, unsigned int)
    SSL_set_cipher_list: Any  # int SSL_set_cipher_list(SSL *, const char *)
    SSL_set_ciphersuites: Any  # int SSL_set_ciphersuites(SSL *, const char *)

    def set_min_max_proto_version(self, ssl: Any, lo: int, hi: int) -> None:
        self.SSL_ctrl(ssl, _SSL_CTRL_SET_MIN_PROTO_VERSION, lo, NULL)
        self.SSL_ctrl(ssl, _SSL_CTRL_SET_MAX_PROTO_VERSION, hi, NULL)

    def set1_groups_list(self, ssl: Any, groups: bytes) -> int:
        return int(self.SSL_ctrl(ssl, _SSL_CTRL_SET_GROUPS_LIST, 0, groups))

    def set1_verify_cert_store(self, ssl: Any, store: crypto.X509Store) -> None:
        self.SSL_ctrl(ssl, _SSL_CTRL_SET_VERIFY_CERT_STORE, 1, store._store)  # set1: up-ref


def _policy_functions() -> SSLPolicyFunctions | None:
    addrs = _rust_symbols(
        "SSL_ctrl",
        "SSL_clear_options",
        "SSL_dup_CA_list",
        "SSL_set_cipher_list",
        "SSL_set_ciphersuites",
        "SSL_set_client_CA_list",
        "SSL_set_session_id_context",
    )
    if addrs is None:
        return None
    cast = _ffi.cast
    return SSLPolicyFunctions(
        SSL_ctrl=cast("long (*)(SSL *, int, long, void *)", addrs["SSL_ctrl"]),
        SSL_clear_options=cast("uint64_t (*)(SSL *, uint64_t)", addrs["SSL_clear_options"]),
        SSL_set_options=_lib.SSL_set_options,
        SSL_set_verify=_lib.SSL_set_verify,
        SSL_set_client_CA_list=cast("void (*)(SSL *, void *)", addrs["SSL_set_client_CA_list"]),
        SSL_dup_CA_list=cast("void *(*)(void *)", addrs["SSL_dup_CA_list"]),
        SSL_set_session_id_context=cast(
            "int (*)(SSL *, const unsigned char *, unsigned int)", addrs["SSL_set_session_id_context"]
        ),
        SSL_set_cipher_list=cast("int (*)(SSL *, const char *)", addrs["SSL_set_cipher_list"]),
        SSL_set_ciphersuites=cast("int (*)(SSL *, const char *)", addrs["SSL_set_ciphersuites"]),
    )


SSL_POLICY: SSLPolicyFunctions | None = _policy_functions()


def x509_name_stack(certs: Iterable[crypto.X509]) -> Any:
    """A STACK_OF(X509_NAME) of the certificates' subjects (freed with the returned object; the
    certificates must outlive it: the names are not copied)."""
    stack = _ffi.gc(_lib.sk_X509_NAME_new_null(), _lib.sk_X509_NAME_free)
    for cert in certs:
        _lib.sk_X509_NAME_push(stack, _lib.X509_get_subject_name(cert._x509))
    return stack

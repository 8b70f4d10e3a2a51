"""Issue 5, TLS to origins, against the real ``tsproxy start``: https:// remap targets, TLS 1.2 and
1.3, verification policy (records, legacy switch and ``@ssl_verify=``) and properties, RFC 6125
names (wildcards, IP SANs, no SNI for IP literals), ``@sni=``, mTLS to the origin, a client key
that does not match its certificate, pooling of TLS origin connections, and origins that cut a
response. The origins are ``tests/origin.py`` servers wrapped in an ``ssl.SSLContext`` (trustme
certificates) that count handshakes and record the SNI they received.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme
from conftest import ProxyProcess, run_tsproxy, write_config_dir
from origin import OriginServer, pattern

Factory = Callable[..., ProxyProcess]
SSL_M = "proxy.process.ssl."
M_VERIFY_FAILED = SSL_M + "origin_server_cert_verify_failed"
M_UNKNOWN_CA = SSL_M + "origin_server_unknown_ca"
M_BAD_CERT = SSL_M + "origin_server_bad_cert"
M_HS_OUT = SSL_M + "total_success_handshake_count_out"
VERIFY_METRICS = (M_VERIFY_FAILED, M_UNKNOWN_CA, M_BAD_CERT)
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
NOT_CALLED = "<sni callback not called>"


# --------------------------------------------------------------------------------------------
# a TLS origin: tests/origin.py's OriginServer behind an ssl.SSLContext
# --------------------------------------------------------------------------------------------


@dataclass
class TLSOrigin(OriginServer):
    """OriginServer whose connections are TLS; records handshakes, SNI, versions, client certs."""

    ctx: ssl.SSLContext | None = None
    handshakes: int = 0
    handshake_errors: list[str] = field(default_factory=list)
    snis: list[str | None] = field(default_factory=list)
    versions: list[str | None] = field(default_factory=list)
    client_certs: list[bool] = field(default_factory=list)

    def _serve(self, sock: socket.socket, conn_id: int) -> None:
        assert self.ctx is not None
        try:
            tls = self.ctx.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            with self._lock:
                self.handshake_errors.append(str(exc))
                self._socks.discard(sock)
            sock.close()
            return
        with self._lock:
            self.handshakes += 1
            self.snis.append(getattr(tls, "seen_sni", NOT_CALLED))
            self.versions.append(tls.version())
            self.client_certs.append(tls.getpeercert(binary_form=True) is not None)
            self._socks.discard(sock)
            self._socks.add(tls)
        OriginServer._serve(self, tls, conn_id)

    def _ep_bye(self, sock: socket.socket, seen: Any, q: dict[str, str]) -> bool:
        """Answer as keep-alive, then close the TLS connection cleanly (close_notify) at once."""
        sock.sendall(self._head(200, "OK", [("Content-Length", "3")]) + b"bye")
        assert isinstance(sock, ssl.SSLSocket)
        with contextlib.suppress(OSError, ValueError):
            sock.unwrap()
        return False

    def _ep_drop(self, sock: socket.socket, seen: Any, q: dict[str, str]) -> bool:
        """Read the request, close without a byte of response."""
        return False


def _record_sni(sslsock: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
    sslsock.seen_sni = name


def tls_origin(
    leaf: trustme.LeafCert, version: str | None = None, client_ca: trustme.CA | None = None
) -> TLSOrigin:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(ctx)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    if client_ca is not None:
        client_ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.sni_callback = _record_sni
    return TLSOrigin(ctx=ctx).start()  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# certificates and origins (module scope: one set for every test)
# --------------------------------------------------------------------------------------------


@dataclass
class PKI:
    ca: trustme.CA
    rogue: trustme.CA
    client_ca: trustme.CA
    files: dict[str, bytes]  # config-dir relative name -> PEM


@pytest.fixture(scope="module")
def pki() -> PKI:
    ca, rogue, client_ca = trustme.CA(), trustme.CA(), trustme.CA()
    client = client_ca.issue_cert("tsproxy-client.test")
    other_client = client_ca.issue_cert("other-client.test")
    front = ca.issue_cert("front.test")
    files: dict[str, bytes] = {
        "origin-ca.pem": ca.cert_pem.bytes(),
        "certs/front.pem": front.private_key_and_cert_chain_pem.bytes(),
        "client/cert.pem": b"".join(b.bytes() for b in client.cert_chain_pems),
        "client/key.pem": client.private_key_pem.bytes(),
        "client/both.pem": client.private_key_and_cert_chain_pem.bytes(),
        # a key that is not the certificate's (same type, so OpenSSL really compares them)
        "client/wrong-key.pem": other_client.private_key_pem.bytes(),
    }
    return PKI(ca, rogue, client_ca, files)


@pytest.fixture(scope="module")
def origins(pki: PKI) -> Iterator[dict[str, TLSOrigin]]:
    ca = pki.ca
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    made = {
        "good12": tls_origin(ca.issue_cert("localhost"), "1.2"),
        "good13": tls_origin(ca.issue_cert("localhost"), "1.3"),
        "wrongname": tls_origin(ca.issue_cert("other.test")),
        "unknownca": tls_origin(pki.rogue.issue_cert("localhost")),
        "expired": tls_origin(
            ca.issue_cert("localhost", not_before=past - datetime.timedelta(days=30), not_after=past)
        ),
        "wild": tls_origin(ca.issue_cert("*.wild.test")),
        "ipsan": tls_origin(ca.issue_cert("127.0.0.1")),
        "mtls13": tls_origin(ca.issue_cert("localhost"), "1.3", client_ca=pki.client_ca),
        "mtls12": tls_origin(ca.issue_cert("localhost"), "1.2", client_ca=pki.client_ca),
    }
    yield made
    for o in made.values():
        o.stop()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def base_records(**extra: Any) -> dict[str, Any]:
    recs: dict[str, Any] = {
        "proxy.config.ssl.client.CA.cert.filename": "origin-ca.pem",
        "proxy.config.http.connect_attempts_timeout": 5,
    }
    recs.update(extra)
    return recs


def start(
    factory: Factory,
    pki: PKI,
    rules: list[str],
    records: dict[str, Any] | None = None,
    *,
    https_front: bool = False,
) -> ProxyProcess:
    files: dict[str, str | bytes] = dict(pki.files)
    files["remap.config"] = "".join(r + "\n" for r in rules)
    recs = base_records(**(records or {}))
    if https_front:
        recs["proxy.config.http.server_ports"] = "{0}:ip-in=127.0.0.1 {1}:ssl:ip-in=127.0.0.1"
        recs["proxy.config.ssl.server.cert.path"] = "."
        recs["proxy.config.ssl.server.private_key.path"] = "."
        files["ssl_multicert.config"] = "dest_ip=* ssl_cert_name=certs/front.pem\n"
    return factory(records=recs, files=files)


def metric(proxy: ProxyProcess, name: str) -> int:
    result = proxy.call("metric.get", {"names": [name]})
    return int(result["metrics"][0][1])


def metrics(proxy: ProxyProcess, names: tuple[str, ...] = VERIFY_METRICS) -> dict[str, int]:
    return {n: metric(proxy, n) for n in names}


def get(
    proxy: ProxyProcess, host: str, path: str = "/bytes?n=100", c: http.client.HTTPConnection | None = None
) -> tuple[int, bytes]:
    own = c is None
    conn = c if c is not None else http.client.HTTPConnection("127.0.0.1", proxy.port(0), timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        if own:
            conn.close()


def wait_len(seq: list[Any], n: int, timeout: float = 5.0) -> list[Any]:
    """Until the origin thread has recorded more than n items (it may lag the proxy's answer)."""
    deadline = time.monotonic() + timeout
    while len(seq) <= n and time.monotonic() < deadline:
        time.sleep(0.01)
    return seq[n:]


def assert_502(proxy: ProxyProcess, status: int, body: bytes, *words: str) -> None:
    """A 502 with the generic body; ``words`` are in the log line that gives the reason."""
    assert status == 502, (status, body)
    assert body == b"502 Bad Gateway\n", body  # no origin address or TLS detail for the client
    line = [ln for ln in proxy.output().splitlines() if "answered 502" in ln][-1]
    for w in words:
        assert w in line, (w, line)


def rule(src: str, origin: TLSOrigin, host: str = "localhost", opts: str = "") -> str:
    return f"map http://{src}/ https://{host}:{origin.port}/ {opts}".rstrip()


# --------------------------------------------------------------------------------------------
# good origins
# --------------------------------------------------------------------------------------------


def test_good_origin_tls12_and_tls13_http_and_https_fronts(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin]
) -> None:
    o12, o13 = origins["good12"], origins["good13"]
    rules = [
        rule("v12.test", o12),
        rule("v13.test", o13),
        f"map https://v12.test/ https://localhost:{o12.port}/",
        f"map https://v13.test/ https://localhost:{o13.port}/",
    ]
    proxy = start(tsproxy_factory, pki, rules, https_front=True)
    hs0, n12, n13 = metric(proxy, M_HS_OUT), len(o12.versions), len(o13.versions)
    for host in ("v12.test", "v13.test"):
        status, body = get(proxy, host, "/bytes?n=70000")
        assert status == 200 and body == pattern(70000), (host, status, body[:200])
    front = ssl.create_default_context(cadata=pki.ca.cert_pem.bytes().decode())
    front.check_hostname = False
    for host in ("v12.test", "v13.test"):
        c = http.client.HTTPSConnection("127.0.0.1", proxy.port(1), timeout=10, context=front)
        try:
            status, body = get(proxy, host, "/bytes?n=3000", c=c)
        finally:
            c.close()
        assert status == 200 and body == pattern(3000), (host, status, body[:200])
    assert o12.versions[n12:] and set(o12.versions[n12:]) == {"TLSv1.2"}
    assert o13.versions[n13:] and set(o13.versions[n13:]) == {"TLSv1.3"}
    # SNI = the origin host name
    assert set(o12.snis[n12:]) == {"localhost"} and set(o13.snis[n13:]) == {"localhost"}
    new_handshakes = len(o12.versions) - n12 + len(o13.versions) - n13
    assert metric(proxy, M_HS_OUT) - hs0 == new_handshakes
    assert metrics(proxy) == dict.fromkeys(VERIFY_METRICS, 0)


# --------------------------------------------------------------------------------------------
# verification policy
# --------------------------------------------------------------------------------------------

BAD = {  # origin -> (counter, words in the 502 body)
    "wrongname": (M_VERIFY_FAILED, ("does not match", "localhost")),
    "unknownca": (M_UNKNOWN_CA, ("certificate",)),
    "expired": (M_BAD_CERT, ("certificate", "expired")),
}


def _check_bad_origins(proxy: ProxyProcess, origins: dict[str, TLSOrigin], policy: str, suffix: str) -> None:
    for name, (counter, words) in BAD.items():
        before = metrics(proxy)
        status, body = get(proxy, f"{name}{suffix}")
        after = metrics(proxy)
        delta = {k: after[k] - before[k] for k in after}
        if policy == "DISABLED":
            assert status == 200 and body == pattern(100), (name, status, body)
            assert delta == dict.fromkeys(VERIFY_METRICS, 0), (name, delta)
            continue
        if policy == "ENFORCED":
            assert_502(proxy, status, body, *words)
        else:
            assert status == 200 and body == pattern(100), (name, status, body)
        assert delta == {k: int(k == counter) for k in VERIFY_METRICS}, (name, policy, delta)


@pytest.mark.parametrize("policy", ["ENFORCED", "PERMISSIVE", "DISABLED"])
def test_policy_from_records(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin], policy: str
) -> None:
    rules = [rule(f"{name}.test", origins[name]) for name in BAD]
    recs = {} if policy == "ENFORCED" else {"proxy.config.ssl.client.verify.server.policy": policy}
    proxy = start(tsproxy_factory, pki, rules, recs)  # ENFORCED is the default: left unset
    _check_bad_origins(proxy, origins, policy, ".test")
    # the worker survived all of it, and a good origin still works
    assert proxy.proc.poll() is None


def test_policy_from_remap_option(tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin]) -> None:
    rules = []
    for policy in ("enforced", "permissive", "disabled"):
        rules += [rule(f"{name}.{policy}", origins[name], opts=f"@ssl_verify={policy}") for name in BAD]
    # the option overrides the records both ways
    proxy = start(tsproxy_factory, pki, rules, {"proxy.config.ssl.client.verify.server.policy": "PERMISSIVE"})
    for policy in ("enforced", "permissive", "disabled"):
        _check_bad_origins(proxy, origins, policy.upper(), f".{policy}")
    proxy2 = start(
        tsproxy_factory,
        pki,
        [rule("wrongname.enforced", origins["wrongname"], opts="@ssl_verify=enforced")],
        {"proxy.config.ssl.client.verify.server.policy": "DISABLED"},
    )
    assert_502(proxy2, *get(proxy2, "wrongname.enforced"), "does not match")


def test_legacy_verify_server_switch(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin]
) -> None:
    rules = [rule(f"{name}.test", origins[name]) for name in BAD]
    off = start(tsproxy_factory, pki, rules, {"proxy.config.ssl.client.verify.server": 0})
    _check_bad_origins(off, origins, "DISABLED", ".test")
    # 1 wins over a PERMISSIVE policy record
    on = start(
        tsproxy_factory,
        pki,
        rules,
        {
            "proxy.config.ssl.client.verify.server": 1,
            "proxy.config.ssl.client.verify.server.policy": "PERMISSIVE",
        },
    )
    _check_bad_origins(on, origins, "ENFORCED", ".test")


def test_verify_properties_signature_and_name(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin]
) -> None:
    rules = [rule(f"{name}.test", origins[name]) for name in BAD]
    sig = start(
        tsproxy_factory, pki, rules, {"proxy.config.ssl.client.verify.server.properties": "SIGNATURE"}
    )
    assert get(sig, "wrongname.test") == (200, pattern(100))
    assert_502(sig, *get(sig, "unknownca.test"), "certificate")
    assert_502(sig, *get(sig, "expired.test"), "expired")
    name = start(tsproxy_factory, pki, rules, {"proxy.config.ssl.client.verify.server.properties": "NAME"})
    assert get(name, "unknownca.test") == (200, pattern(100))
    assert get(name, "expired.test") == (200, pattern(100))
    assert_502(name, *get(name, "wrongname.test"), "does not match")


# --------------------------------------------------------------------------------------------
# names: wildcards, IP SANs, SNI
# --------------------------------------------------------------------------------------------


def test_wildcard_and_ip_san_origins_and_sni(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin]
) -> None:
    wild, ipsan, good = origins["wild"], origins["ipsan"], origins["good13"]
    rules = [
        rule("x.wild", wild, opts="@sni=x.wild.test"),
        rule("xx.wild", wild, opts="@sni=X.Wild.Test"),  # case-insensitive
        rule("deep.wild", wild, opts="@sni=y.x.wild.test"),  # * is one label
        rule("bare.wild", wild, opts="@sni=wild.test"),
        rule("ip", ipsan, host="127.0.0.1"),
        rule("ip-by-name", ipsan),  # the IP SAN does not name "localhost"
        rule("ip-nosan", good, host="127.0.0.1"),  # the "localhost" cert has no IP SAN
        rule("sni-override", good, opts="@sni=localhost"),
        rule("sni-bad-override", good, opts="@sni=elsewhere.test"),
    ]
    proxy = start(tsproxy_factory, pki, rules)
    n = len(wild.snis)
    assert get(proxy, "x.wild") == (200, pattern(100))
    assert wild.snis[n:] == ["x.wild.test"]
    assert get(proxy, "xx.wild") == (200, pattern(100))
    for host in ("deep.wild", "bare.wild"):
        n = len(wild.snis)
        assert_502(proxy, *get(proxy, host), "does not match")
        assert wait_len(wild.snis, n) == [{"deep.wild": "y.x.wild.test", "bare.wild": "wild.test"}[host]]

    n = len(ipsan.snis)
    assert get(proxy, "ip") == (200, pattern(100))
    assert ipsan.snis[n:] == [None]  # no SNI for an IP literal (RFC 6066)
    n = len(ipsan.snis)
    assert_502(proxy, *get(proxy, "ip-by-name"), "does not match")
    assert wait_len(ipsan.snis, n) == ["localhost"]

    n = len(good.snis)
    assert_502(proxy, *get(proxy, "ip-nosan"), "127.0.0.1")
    assert wait_len(good.snis, n) == [None]
    assert get(proxy, "sni-override") == (200, pattern(100))
    n = len(good.snis)
    assert_502(proxy, *get(proxy, "sni-bad-override"), "elsewhere.test")
    assert wait_len(good.snis, n) == ["elsewhere.test"]


# --------------------------------------------------------------------------------------------
# mTLS to origins
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_client_certificate_required_by_origin(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin], version: str
) -> None:
    o = origins["mtls12" if version == "1.2" else "mtls13"]
    rules = [rule("mtls", o), rule("mtls-opt", o, opts="@client_cert=client/both.pem")]
    with_cert = start(
        tsproxy_factory,
        pki,
        rules,
        {
            "proxy.config.ssl.client.cert.filename": "client/cert.pem",
            "proxy.config.ssl.client.private_key.filename": "client/key.pem",
        },
    )
    n = len(o.client_certs)
    assert get(with_cert, "mtls") == (200, pattern(100))
    assert o.client_certs[n:] == [True]

    without = start(tsproxy_factory, pki, rules)
    errors = len(o.handshake_errors)
    status, body = get(without, "mtls")
    assert_502(without, status, body)
    assert wait_len(o.handshake_errors, errors)  # the origin refused the handshake
    # the per-rule option supplies a certificate on a proxy that has none in records
    n = len(o.client_certs)
    assert get(without, "mtls-opt") == (200, pattern(100))
    assert o.client_certs[n:] == [True]
    assert without.proc.poll() is None


def test_client_key_not_matching_cert_is_a_startup_error(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin], tmp_path: Any
) -> None:
    recs = base_records(
        **{
            "proxy.config.ssl.client.cert.filename": "client/cert.pem",
            "proxy.config.ssl.client.private_key.filename": "client/wrong-key.pem",
        }
    )
    files: dict[str, str | bytes] = dict(pki.files)
    files["remap.config"] = rule("a.test", origins["good13"]) + "\n"
    cdir = write_config_dir(tmp_path / "check", recs, files)
    check = run_tsproxy("config", "check", "--config-dir", str(cdir))
    assert check.returncode != 0
    assert "wrong-key.pem" in check.stdout + check.stderr, check
    assert "does not match" in check.stdout + check.stderr, check

    proxy = tsproxy_factory(records=recs, files=files, wait=False)
    code = proxy.wait_exit(20)
    assert code != 0
    out = proxy.output()
    assert "wrong-key.pem" in out and "does not match" in out, out


# --------------------------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------------------------


def test_tls_origin_connections_are_pooled(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin]
) -> None:
    o = origins["good13"]
    rules = [rule("a.test", o), rule("b.test", o, opts="@ssl_verify=permissive")]
    proxy = start(tsproxy_factory, pki, rules)
    hs0, origin_hs0, conns0 = metric(proxy, M_HS_OUT), o.handshakes, o.connections
    c = http.client.HTTPConnection("127.0.0.1", proxy.port(0), timeout=10)
    try:
        for i in range(10):
            assert get(proxy, "a.test", f"/bytes?n={100 + i}", c=c) == (200, pattern(100 + i))
    finally:
        c.close()
    assert o.handshakes - origin_hs0 == 1, o.handshakes - origin_hs0
    assert o.connections - conns0 == 1
    assert metric(proxy, M_HS_OUT) - hs0 == 1
    # a rule with other TLS options never shares a connection with the first one
    origin_hs1 = o.handshakes
    c = http.client.HTTPConnection("127.0.0.1", proxy.port(0), timeout=10)
    try:
        for i in range(6):
            assert get(proxy, "b.test" if i % 2 else "a.test", c=c) == (200, pattern(100))
    finally:
        c.close()
    assert o.handshakes - origin_hs1 == 1  # a.test reused the pooled one, b.test made its own
    assert metric(proxy, M_HS_OUT) - hs0 == 2


# --------------------------------------------------------------------------------------------
# origin faults
# --------------------------------------------------------------------------------------------


def _read_cut(proxy: ProxyProcess, host: str, path: str) -> tuple[bytes, bytes]:
    """Raw request; everything the proxy sent until it closed (bounded)."""
    with socket.create_connection(("127.0.0.1", proxy.port(0)), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                piece = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not piece:
                break
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


@contextlib.contextmanager
def _not_tls_origin() -> Iterator[int]:
    """Answers anything with a plain-text HTTP 400 and closes (an http origin mapped as https)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    lst.settimeout(0.1)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                s, _ = lst.accept()
            except (TimeoutError, OSError):
                continue
            with s:
                s.settimeout(2)
                with contextlib.suppress(OSError):
                    s.recv(4096)
                    s.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield int(lst.getsockname()[1])
    finally:
        stop.set()
        t.join(5)
        lst.close()


def test_origin_faults_give_clean_errors(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin]
) -> None:
    o = origins["good13"]
    with _not_tls_origin() as plain_port:
        rules = [rule("a.test", o), f"map http://plain.test/ https://localhost:{plain_port}/"]
        proxy = start(tsproxy_factory, pki, rules)
        pids = proxy.worker_pids()

        # the origin closes before any response byte: 502 with a reason
        status, body = get(proxy, "a.test", "/drop")
        assert_502(proxy, status, body, "closed")

        # not TLS at all on the other end
        t0 = time.monotonic()
        status, body = get(proxy, "plain.test")
        assert_502(proxy, status, body, "TLS")
        assert time.monotonic() - t0 < 4

        # same worker, still serving
        assert get(proxy, "a.test") == (200, pattern(100))
        assert proxy.worker_pids() == pids


# Timing-dependent failure seen at 044570a (about half of full-file runs, when the origin's FIN is
# already in when the proxy reads the body): an empty reply. SSLNetVConnection._ssl_read leaves
# _ssl_bio_has_data True after draining the read BIO, the origin VC is re-read in the same loop pass
# and sees EOS before the client's write is flushed, and HttpSM (http_response.response_failed) close()s the
# client VC, dropping the buffered head and body.
def test_origin_cutting_the_body_gives_the_client_the_head_and_a_cut_body(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin]
) -> None:
    o = origins["good13"]
    proxy = start(tsproxy_factory, pki, [rule("a.test", o)])
    pids = proxy.worker_pids()
    for _ in range(3):
        # the client sees the head, part of the body, then a cut connection: never a complete
        # response, never an empty reply
        head, body = _read_cut(proxy, "a.test", "/cut?n=100000&send=3000")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"content-length: 100000" in head.lower()
        assert len(body) < 100000 and body == pattern(len(body))
    assert get(proxy, "a.test") == (200, pattern(100))
    assert proxy.worker_pids() == pids


def test_origin_that_never_answers_the_client_hello_is_502_after_connect_timeout(
    tsproxy_factory: Factory, pki: PKI
) -> None:
    # TCP accepted (the kernel does it), then silence: the handshake is bounded by
    # connect_attempts_timeout, and the worker is never blocked meanwhile.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        port = silent.getsockname()[1]
        proxy = start(
            tsproxy_factory,
            pki,
            [f"map http://silent.test/ https://localhost:{port}/", "map http://x/ http://127.0.0.1:9/"],
            {"proxy.config.http.connect_attempts_timeout": 1},
        )
        result: dict[str, Any] = {}

        def slow() -> None:
            t0 = time.monotonic()
            result["r"] = get(proxy, "silent.test")
            result["t"] = time.monotonic() - t0

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        status, _ = get(proxy, "x")  # another transaction meanwhile: answered at once
        assert status == 502 and time.monotonic() - t0 < 0.5
        t.join(8)
        status, body = result["r"]
        assert_502(proxy, status, body, "TLS")
        assert 0.8 < result["t"] < 4, result["t"]
    finally:
        silent.close()


def test_default_trust_store_does_not_know_the_test_ca(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin]
) -> None:
    proxy = start(
        tsproxy_factory,
        pki,
        [rule("a.test", origins["good13"])],
        {"proxy.config.ssl.client.CA.cert.filename": None},
    )
    before = metric(proxy, M_UNKNOWN_CA)
    assert_502(proxy, *get(proxy, "a.test"), "certificate")
    assert metric(proxy, M_UNKNOWN_CA) == before + 1


def test_client_protocol_records(tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin]) -> None:
    rules = [rule("v12.test", origins["good12"]), rule("v13.test", origins["good13"])]
    only13 = start(tsproxy_factory, pki, rules, {"proxy.config.ssl.client.TLSv1_2": 0})
    assert_502(only13, *get(only13, "v12.test"), "TLS")
    assert get(only13, "v13.test") == (200, pattern(100))
    only12 = start(tsproxy_factory, pki, rules, {"proxy.config.ssl.client.TLSv1_3": 0})
    assert get(only12, "v12.test") == (200, pattern(100))
    assert_502(only12, *get(only12, "v13.test"), "TLS")


def test_client_groups_list_record(tsproxy_factory: Factory, pki: PKI) -> None:
    """proxy.config.ssl.client.groups_list: the key-exchange groups offered to origins."""
    origin = tls_origin(pki.ca.issue_cert("localhost"), "1.3")
    origin.ctx.set_ecdh_curve("prime256v1")  # the origin agrees to P-256 only
    try:
        rules = [rule("p256.test", origin)]
        p384 = start(tsproxy_factory, pki, rules, {"proxy.config.ssl.client.groups_list": "P-384"})
        assert_502(p384, *get(p384, "p256.test"), "TLS")
        p256 = start(tsproxy_factory, pki, rules, {"proxy.config.ssl.client.groups_list": "X25519:P-256"})
        assert get(p256, "p256.test") == (200, pattern(100))
    finally:
        origin.stop()


def test_stale_pooled_tls_connection_is_retried(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin]
) -> None:
    o = origins["good13"]
    proxy = start(tsproxy_factory, pki, [rule("a.test", o)])
    conns0 = o.connections
    c = http.client.HTTPConnection("127.0.0.1", proxy.port(0), timeout=10)
    try:
        assert get(proxy, "a.test", "/bytes?n=5", c=c) == (200, pattern(5))
        assert get(proxy, "a.test", "/stale?n=6", c=c) == (200, pattern(6))
    finally:
        c.close()
    assert o.connections - conns0 == 2


def test_large_bodies_and_concurrent_clients_over_tls_origin(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin]
) -> None:
    import hashlib
    import json

    o = origins["good12"]
    proxy = start(tsproxy_factory, pki, [rule("a.test", o)])
    n = 6 * 1024 * 1024 + 17
    assert get(proxy, "a.test", f"/big?n={n}") == (200, pattern(n))
    body = pattern(3 * 1024 * 1024 + 5)
    c = http.client.HTTPConnection("127.0.0.1", proxy.port(0), timeout=20)
    try:
        c.request("POST", "/echo", body=body, headers={"Host": "a.test"})
        resp = c.getresponse()
        echo = json.loads(resp.read())
    finally:
        c.close()
    assert resp.status == 200
    assert echo["body_len"] == len(body) and echo["body_sha256"] == hashlib.sha256(body).hexdigest()

    hs0 = o.handshakes
    errors: list[Any] = []

    def client(i: int) -> None:
        cc = http.client.HTTPConnection("127.0.0.1", proxy.port(0), timeout=20)
        try:
            for j in range(5):
                got = get(proxy, "a.test", f"/bytes?n={1000 + i * 10 + j}", c=cc)
                if got != (200, pattern(1000 + i * 10 + j)):
                    errors.append((i, j, got[0], got[1][:100]))
        except Exception as exc:
            errors.append((i, repr(exc)))
        finally:
            cc.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:5]
    assert 1 <= o.handshakes - hs0 <= 16  # never more TLS connections than concurrent clients


def test_reload_with_mismatched_client_key_is_refused(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin]
) -> None:
    o = origins["mtls13"]
    proxy = start(
        tsproxy_factory,
        pki,
        [rule("mtls", o)],
        {
            "proxy.config.ssl.client.cert.filename": "client/cert.pem",
            "proxy.config.ssl.client.private_key.filename": "client/key.pem",
        },
    )
    assert get(proxy, "mtls") == (200, pattern(100))
    (proxy.config_dir / "client/key.pem").write_bytes(pki.files["client/wrong-key.pem"])
    result = proxy.ctl("reload")
    assert result.returncode != 0
    assert "key.pem" in result.stdout + result.stderr and "does not match" in result.stdout + result.stderr
    # the old context (loaded key) keeps working, on a new origin connection too
    c = http.client.HTTPConnection("127.0.0.1", proxy.port(0), timeout=10)
    try:
        assert get(proxy, "mtls", "/close", c=c) == (200, b"close")
        assert get(proxy, "mtls", c=c) == (200, pattern(100))
    finally:
        c.close()
    assert proxy.proc.poll() is None


def test_client_key_mismatch_without_https_rule_still_fails_start(tsproxy_factory: Factory, pki: PKI) -> None:
    # The client context is part of the configuration even before a rule needs it (ATS builds it
    # at start): a bad key must not wait for the first https:// rule to be added by a reload.
    files: dict[str, str | bytes] = dict(pki.files)
    files["remap.config"] = "map http://a.test/ http://127.0.0.1:9/\n"
    recs = base_records(
        **{
            "proxy.config.ssl.client.cert.filename": "client/cert.pem",
            "proxy.config.ssl.client.private_key.filename": "client/wrong-key.pem",
        }
    )
    proxy = tsproxy_factory(records=recs, files=files, wait=False)
    code = proxy.wait_exit(20)
    out = proxy.output()
    assert code != 0, out
    assert "wrong-key.pem" in out and "does not match" in out, out


def test_idle_pooled_connection_closed_by_origin_with_close_notify(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin]
) -> None:
    o = origins["good13"]
    proxy = start(tsproxy_factory, pki, [rule("a.test", o)])
    c = http.client.HTTPConnection("127.0.0.1", proxy.port(0), timeout=10)
    try:
        conns0 = o.connections
        assert get(proxy, "a.test", "/bye", c=c) == (200, b"bye")
        time.sleep(0.3)  # the close_notify reaches the idle pooled connection
        for i in range(3):
            assert get(proxy, "a.test", f"/bytes?n={i + 1}", c=c) == (200, pattern(i + 1))
    finally:
        c.close()
    assert o.connections - conns0 == 2
    assert proxy.proc.poll() is None


def test_reload_tightening_verification_does_not_reuse_connections_verified_before(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, TLSOrigin]
) -> None:
    from conftest import records_text

    o = origins["wrongname"]
    recs = {"proxy.config.ssl.client.verify.server.policy": "DISABLED"}
    proxy = start(tsproxy_factory, pki, [rule("w.test", o)], recs)
    c = http.client.HTTPConnection("127.0.0.1", proxy.port(0), timeout=10)
    try:
        assert get(proxy, "w.test", c=c) == (200, pattern(100))  # pooled, verified by nobody
        merged = {
            **proxy.records,
            **base_records(),
            "proxy.config.ssl.client.verify.server.policy": "ENFORCED",
        }
        (proxy.config_dir / "records.config").write_text(records_text(merged))
        # a second rule to the same origin, other pool key (its @sni): always a new connection
        (proxy.config_dir / "remap.config").write_text(
            rule("w.test", o) + "\n" + rule("w2.test", o, opts="@sni=localhost") + "\n"
        )
        result = proxy.ctl("reload")
        assert result.returncode == 0, result
        # the reload is in force: a new origin connection gets the ENFORCED answer ...
        assert_502(proxy, *get(proxy, "w2.test"), "does not match")
        # ... and so must the rule whose connection was pooled before the reload
        statuses = [get(proxy, "w.test")[0] for _ in range(2)]
        assert statuses == [502, 502], statuses
        assert get(proxy, "w.test", c=c)[0] == 502
    finally:
        c.close()


def test_invalid_sni_option_is_a_config_error(tsproxy_factory: Factory, pki: PKI, tmp_path: Any) -> None:
    # A label over 63 octets cannot go into a server_name extension: refused at load with the
    # rule's place, instead of a transaction that never gets an answer.
    files: dict[str, str | bytes] = dict(pki.files)
    files["remap.config"] = "map http://ok.test/ http://127.0.0.1:9/\n" + (
        f"map http://long.test/ https://localhost:9/ @sni={'a' * 64}.test\n"
    )
    cdir = write_config_dir(tmp_path / "check", base_records(), files)
    check = run_tsproxy("config", "check", "--config-dir", str(cdir))
    assert check.returncode != 0
    assert "remap.config:2:" in check.stdout + check.stderr, check
    assert "not a valid host name" in check.stdout + check.stderr, check


def test_long_chain_and_verify_depth(tsproxy_factory: Factory, pki: PKI) -> None:
    # Five intermediates and an RSA leaf (a Certificate message of several KB) verify with the
    # default depth; proxy.config.ssl.client.verify.depth 2 refuses the chain.
    ca = pki.ca
    for _ in range(5):
        ca = ca.create_child_ca()
    o = tls_origin(ca.issue_cert("localhost", key_type=trustme.KeyType.RSA))
    try:
        rules = [rule("chain.test", o)]
        ok = start(tsproxy_factory, pki, rules)
        assert get(ok, "chain.test") == (200, pattern(100))
        short = start(tsproxy_factory, pki, rules, {"proxy.config.ssl.client.verify.depth": 2})
        before = metrics(short)
        assert_502(short, *get(short, "chain.test"), "certificate")
        after = metrics(short)
        assert after[M_VERIFY_FAILED] - before[M_VERIFY_FAILED] == 1, (before, after)
    finally:
        o.stop()

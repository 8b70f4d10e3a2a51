"""ssl_multicert.config: parsing with FILE:LINE errors, and loading real trustme certificates."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from iocore.net.ssl_cert_lookup import CertOpt, SSLCertLookup
from iocore.net.ssl_config import SSLConfigParams
from iocore.net.ssl_multicert import DestIP, load_cert_lookup, parse_multicert
from iocore.net.tls.context import load_or_create_ticket_keys, session_reused
from iocore.records.errors import ConfigError

F = "ssl_multicert.config"

# ----------------------------------------------------------------------------- parsing


def test_parse_quoting_comments_case() -> None:
    text = (
        "# a comment\n"
        "\n"
        '   SSL_CERT_NAME="a b.pem,c.pem"  ssl_key_name=a.key,c.key dest_ip=1.2.3.4:443  # trailing\n'
        "ssl_cert_name=d.pem ssl_ca_name=chain.pem dest_ip=* ssl_ticket_enabled=0 ssl_ticket_number=3\n"
        "action=tunnel dest_ip=[2001:db8::1]:8443 tunnel_route=origin.example:443\n"
        'ssl_cert_name=e.pem dest_ip=[::1] ssl_key_dialog="exec:/bin/echo secret"\n'
    )
    a, d, t, e = parse_multicert(text, F)
    assert (a.line, a.cert_names, a.key_names, a.dest_ip) == (
        3,
        ("a b.pem", "c.pem"),
        ("a.key", "c.key"),
        DestIP("1.2.3.4", 443),
    )
    assert (d.ca_name, d.dest_ip, d.ticket_enabled, d.ticket_number) == ("chain.pem", DestIP(None), False, 3)
    assert t.tunnel and t.cert_names == () and t.dest_ip == DestIP("2001:db8::1", 8443)
    assert t.tunnel_route == "origin.example:443" and t.source == f"{F}:5"
    assert e.dest_ip == DestIP("::1", None) and e.key_dialog is not None
    assert e.key_dialog.argv == ("/bin/echo", "secret")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ssl_cert_name=a.pem bogus=1", "2: unknown key 'bogus'"),
        ("dest_ip=1.2.3.4", "2: ssl_cert_name is missing"),
        ("ssl_cert_name=a.pem dest_ip=1.2.3", "2: bad dest_ip '1.2.3'"),
        ("ssl_cert_name=a.pem dest_ip=1.2.3.4:99999", "2: bad dest_ip '1.2.3.4:99999': bad port"),
        ("ssl_cert_name=a.pem dest_ip=[::1", "2: bad dest_ip"),
        ('ssl_cert_name="a.pem', "2: unterminated quoted value"),
        ("ssl_cert_name", "2: expected key=value"),
        (
            "ssl_cert_name=a.pem,b.pem ssl_key_name=a.key",
            "2: ssl_key_name lists 1 files but ssl_cert_name lists 2",
        ),
        ("ssl_cert_name=a.pem ssl_ticket_enabled=yes", "2: ssl_ticket_enabled must be 0 or 1"),
        ("ssl_cert_name=a.pem ssl_ticket_number=-1", "2: ssl_ticket_number must be a number"),
        ("ssl_cert_name=a.pem action=drop", "2: unknown action 'drop'"),
        ("ssl_cert_name=a.pem tunnel_route=x:1", "2: tunnel_route needs action=tunnel"),
        ("action=tunnel tunnel_route=nohost", "2: bad tunnel_route 'nohost'"),
        ("ssl_cert_name=a.pem ssl_key_dialog=builtin", "2: ssl_key_dialog=builtin is not supported"),
        ("ssl_cert_name=a.pem SSL_CERT_NAME=b.pem", "2: SSL_CERT_NAME given twice"),
        ("ssl_cert_name=a.pem dest_ip=*\nssl_cert_name=b.pem dest_ip=*", "3: second dest_ip=* entry"),
    ],
)
def test_parse_errors_have_file_and_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_multicert("# header\n" + text + "\n", F)
    assert str(err.value).startswith(f"{F}:{message}"), str(err.value)


# ----------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _write(dir_: Path, name: str, leaf: trustme.LeafCert) -> tuple[str, str]:
    (dir_ / f"{name}.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (dir_ / f"{name}.key").write_bytes(leaf.private_key_pem.bytes())
    return f"{name}.pem", f"{name}.key"


def _setup(tmp_path: Path, text: str, **rec: object) -> SSLConfigParams:
    (tmp_path / "certs").mkdir(exist_ok=True)
    (tmp_path / "keys").mkdir(exist_ok=True)
    (tmp_path / F).write_text(text)
    records: dict[str, object] = {
        "proxy.config.ssl.server.cert.path": "certs",
        "proxy.config.ssl.server.private_key.path": "keys",
    }
    records.update(rec)
    return SSLConfigParams.from_records(records, tmp_path)


def _pair(tmp_path: Path, ca: trustme.CA, name: str, *idents: str, **kw: object) -> tuple[str, str]:
    leaf = ca.issue_cert(*idents, **kw)  # type: ignore[arg-type]
    (tmp_path / "certs" if (tmp_path / "certs").exists() else tmp_path).mkdir(exist_ok=True)
    (tmp_path / "certs" / f"{name}.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (tmp_path / "keys").mkdir(exist_ok=True)
    (tmp_path / "keys" / f"{name}.key").write_bytes(leaf.private_key_pem.bytes())
    return f"{name}.pem", f"{name}.key"


def _handshake(
    cc_ctx: SSL.Context, sctx: SSL.Context, sni: bytes, session: SSL.Session | None = None
) -> SSL.Connection:
    server, client = SSL.Connection(sctx), SSL.Connection(cc_ctx)
    server.set_accept_state()
    client.set_connect_state()
    client.set_tlsext_host_name(sni)
    if session is not None:
        client.set_session(session)
    for _ in range(12):
        for conn in (client, server):
            with contextlib.suppress(SSL.WantReadError):
                conn.do_handshake()
            with contextlib.suppress(SSL.WantReadError, SSL.Error):
                conn.recv(1)
        for src, dst in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                dst.bio_write(src.bio_read(65536))
    return client


def _client(ca: trustme.CA, version: int | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ca.configure_trust(ctx)
    ctx.set_verify(SSL.VERIFY_PEER)
    if version is not None:
        ctx.set_min_proto_version(version)
        ctx.set_max_proto_version(version)
    return ctx


def test_load_indexes_names_and_addresses(tmp_path: Path, ca: trustme.CA) -> None:
    (tmp_path / "certs").mkdir()
    a_cert, a_key = _pair(tmp_path, ca, "a", "www.a.com", "*.b.com", common_name="cn.a.com")
    d_cert, d_key = _pair(tmp_path, ca, "d", "default.example")
    params = _setup(
        tmp_path,
        f"ssl_cert_name={a_cert} ssl_key_name={a_key} dest_ip=10.0.0.1:443\n"
        f"ssl_cert_name={d_cert} ssl_key_name={d_key} dest_ip=*\n"
        "action=tunnel dest_ip=10.9.9.9 tunnel_route=origin:443\n",
    )
    lookup = load_cert_lookup(params, load_or_create_ticket_keys(None))
    a = lookup.find("WWW.A.COM")
    assert a is not None and a.source == f"{F}:1" and a.ctx is not None
    assert set(a.names) == {"cn.a.com", "www.a.com", "*.b.com"}
    assert lookup.find("cn.a.com") is a and lookup.find("x.b.com") is a
    assert lookup.find_addr("10.0.0.1", 443) is a
    assert lookup.find_addr("10.0.0.1", 80) is None
    assert (
        lookup.default_context.source == f"{F}:2" and lookup.find("default.example") is lookup.default_context
    )
    tunnel = lookup.find_addr("10.9.9.9", 1)
    assert tunnel is not None and tunnel.opt is CertOpt.TUNNEL and tunnel.ctx is None
    assert tunnel.tunnel_route == "origin:443"
    assert len(lookup.contexts) == 3

    client = _handshake(_client(ca), a.ctx, b"x.b.com")
    assert client.get_peer_certificate() is not None


def test_missing_multicert_file_is_empty(tmp_path: Path) -> None:
    params = SSLConfigParams.from_records({}, tmp_path)
    lookup = load_cert_lookup(params, None)
    assert isinstance(lookup, SSLCertLookup) and lookup.contexts == ()
    assert lookup.default_context.ctx is None


def test_duplicate_names_warn(tmp_path: Path, ca: trustme.CA) -> None:
    (tmp_path / "certs").mkdir()
    one = _pair(tmp_path, ca, "one", "dup.example")
    two = _pair(tmp_path, ca, "two", "dup.example")
    params = _setup(
        tmp_path,
        f"ssl_cert_name={one[0]} ssl_key_name={one[1]}\nssl_cert_name={two[0]} ssl_key_name={two[1]}\n",
    )
    lookup = load_cert_lookup(params, None)
    found = lookup.find("dup.example")
    assert found is not None and found.source == f"{F}:1"
    assert any(f"{F}:2" in w for w in lookup.warnings)


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
def test_ecdsa_rsa_comma_list(tmp_path: Path, ca: trustme.CA, version: int) -> None:
    (tmp_path / "certs").mkdir()
    e = _pair(tmp_path, ca, "e", "dual.example", key_type=trustme.KeyType.ECDSA)
    r = _pair(tmp_path, ca, "r", "dual.example", key_type=trustme.KeyType.RSA)
    params = _setup(tmp_path, f'ssl_cert_name="{e[0]},{r[0]}" ssl_key_name="{e[1]},{r[1]}"\n')
    cc = load_cert_lookup(params, None).find("dual.example")
    assert cc is not None and cc.ctx is not None

    client = _handshake(_client(ca, version), cc.ctx, b"dual.example")
    assert isinstance(
        client.get_peer_certificate(as_cryptography=True).public_key(), ec.EllipticCurvePublicKey
    )  # type: ignore[union-attr]

    rsa_only = _client(ca, version)
    assert _lib.SSL_CTX_set1_sigalgs_list(rsa_only._context, b"rsa_pss_rsae_sha256:RSA+SHA256") == 1
    client = _handshake(rsa_only, cc.ctx, b"dual.example")
    peer = client.get_peer_certificate(as_cryptography=True)
    assert peer is not None and not isinstance(peer.public_key(), ec.EllipticCurvePublicKey)


def test_key_inside_cert_file_and_ca_name(tmp_path: Path, ca: trustme.CA) -> None:
    inter = ca.create_child_ca()
    leaf = inter.issue_cert("chained.example")
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "both.pem").write_bytes(
        leaf.cert_chain_pems[0].bytes() + leaf.private_key_pem.bytes()
    )
    (tmp_path / "certs" / "inter.pem").write_bytes(inter.cert_pem.bytes())
    params = _setup(tmp_path, "ssl_cert_name=both.pem ssl_ca_name=inter.pem\n")
    cc = load_cert_lookup(params, None).find("chained.example")
    assert cc is not None and cc.ctx is not None
    client = _handshake(_client(ca), cc.ctx, b"chained.example")
    assert client.get_peer_certificate() is not None


def test_ticket_resumption_survives_reload(tmp_path: Path, ca: trustme.CA) -> None:
    (tmp_path / "certs").mkdir()
    c, k = _pair(tmp_path, ca, "t", "tickets.example")
    (tmp_path / "ticket.key").write_bytes(bytes(range(48)))
    params = _setup(
        tmp_path,
        f"ssl_cert_name={c} ssl_key_name={k}\n",
        **{"proxy.config.ssl.server.ticket_key.filename": str(tmp_path / "ticket.key")},
    )
    assert params.ticket_key_filename is not None
    before = load_cert_lookup(params, load_or_create_ticket_keys(params.ticket_key_filename)).find(
        "tickets.example"
    )
    after = load_cert_lookup(params, load_or_create_ticket_keys(params.ticket_key_filename)).find(
        "tickets.example"
    )
    assert before is not None and after is not None and before.ctx is not None and after.ctx is not None
    cctx = _client(ca, SSL.TLS1_3_VERSION)
    first = _handshake(cctx, before.ctx, b"tickets.example")
    session = first.get_session()
    assert session is not None
    assert session_reused(_handshake(cctx, after.ctx, b"tickets.example", session))


def test_line_ticket_switch(tmp_path: Path, ca: trustme.CA) -> None:
    (tmp_path / "certs").mkdir()
    c, k = _pair(tmp_path, ca, "n", "noticket.example")
    params = _setup(tmp_path, f"ssl_cert_name={c} ssl_key_name={k} ssl_ticket_enabled=0\n")
    cc = load_cert_lookup(params, None).find("noticket.example")
    assert cc is not None and not cc.ssl_ticket_enabled and cc.ctx is not None
    assert cc.ctx.set_options(0) & SSL.OP_NO_TICKET  # set_options returns the current mask


def test_key_dialog_exec(tmp_path: Path, ca: trustme.CA) -> None:
    from cryptography.hazmat.primitives import serialization

    (tmp_path / "certs").mkdir()
    c, k = _pair(tmp_path, ca, "enc", "enc.example")
    key_path = tmp_path / "keys" / k
    pkey = serialization.load_pem_private_key(key_path.read_bytes(), None)
    key_path.write_bytes(
        pkey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"sesame"),
        )
    )
    script = tmp_path / "pass.py"
    script.write_text("print('sesame')\n")
    params = _setup(
        tmp_path, f'ssl_cert_name={c} ssl_key_name={k} ssl_key_dialog="exec:{sys.executable} {script}"\n'
    )
    cc = load_cert_lookup(params, None).find("enc.example")
    assert cc is not None and cc.ctx is not None
    params = _setup(tmp_path, f"ssl_cert_name={c} ssl_key_name={k}\n")
    with pytest.raises(ConfigError, match=rf"{F}:1: .*{k}: private key is encrypted"):
        load_cert_lookup(params, None)


def test_load_errors_name_line_and_file(tmp_path: Path, ca: trustme.CA) -> None:
    (tmp_path / "certs").mkdir()
    good = _pair(tmp_path, ca, "good", "good.example")
    other = _pair(tmp_path, ca, "other", "other.example")
    cases = [
        ("ssl_cert_name=missing.pem", r"missing\.pem: cannot read certificate"),
        (f"ssl_cert_name={good[0]} ssl_key_name=missing.key", r"missing\.key: cannot read private key"),
        (f"ssl_cert_name={good[0]} ssl_key_name={other[1]}", r"other\.key: private key does not match"),
        (f"ssl_cert_name={good[0]}", r"good\.pem: bad private key"),  # no key in the cert file
        (
            f"ssl_cert_name={good[0]} ssl_key_name={good[1]} ssl_ca_name=nochain.pem",
            r"nochain\.pem: cannot read",
        ),
    ]
    for line, pattern in cases:
        params = _setup(tmp_path, f"# comment\n{line}\n")
        with pytest.raises(ConfigError, match=rf"^.*{F}:2: .*{pattern}"):
            load_cert_lookup(params, None)

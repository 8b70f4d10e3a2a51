"""A small PKI for the OCSP tests: a CA, leaves with (or without) an AIA OCSP URL, responder
certificates, and a local OCSP responder that is ``openssl ocsp`` itself.

OpenSSL 3.0's ``openssl ocsp -port`` binds every address of the host; the tests may bind
127.0.0.1 only, so the responder here is a small HTTP server on 127.0.0.1 that hands each
request to ``openssl ocsp -index ... -reqin REQ -respout RESP`` (openssl's responder, one request
per run) and sends back what it wrote. POST and GET (RFC 6960 appendix A) are both served.
"""

from __future__ import annotations

import base64
import datetime
import subprocess
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Issued:
    cert: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)


@dataclass
class PKI:
    """A CA (``ca``) that issues leaves and responder certificates."""

    name: str = "OCSP Test CA"
    ca: Issued = field(init=False)

    def __post_init__(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(self.name))
            .issuer_name(_name(self.name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        self.ca = Issued(cert, key)

    def issue(
        self, cn: str, *, ocsp_url: str | None = None, ocsp_signing: bool = False, rsa_key: bool = False
    ) -> Issued:
        key: PrivateKey = (
            rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=10))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if ocsp_signing:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False
            )
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
        if ocsp_url is not None:
            builder = builder.add_extension(
                x509.AuthorityInformationAccess(
                    [
                        x509.AccessDescription(
                            AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url)
                        )
                    ]
                ),
                critical=False,
            )
        return Issued(builder.sign(self.ca.key, hashes.SHA256()), key)


def index_line(cert: x509.Certificate, revoked: bool = False) -> str:
    """One line of an ``openssl ca`` index.txt (what ``openssl ocsp -index`` reads)."""
    expiry = cert.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
    revoked_at = (NOW - datetime.timedelta(hours=1)).strftime("%y%m%d%H%M%SZ") if revoked else ""
    dn = "/" + cert.subject.rfc4514_string().replace(",", "/")
    serial = f"{cert.serial_number:X}"
    serial = "0" * (len(serial) % 2) + serial  # openssl writes whole bytes
    return f"{'R' if revoked else 'V'}\t{expiry}\t{revoked_at}\t{serial}\tunknown\t{dn}\n"


class OCSPResponder:
    """openssl ocsp behind an HTTP server on 127.0.0.1 (see the module doc). ``requests`` counts
    the requests answered; ``index`` (certificate -> revoked) may be changed between requests."""

    def __init__(
        self, workdir: Path, pki: PKI, signer: Issued | None = None, nmin: int | None = None
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        signer = signer or pki.ca
        (self.dir / "ca.pem").write_bytes(pki.ca.cert_pem)
        (self.dir / "rsigner.pem").write_bytes(signer.cert_pem)
        (self.dir / "rkey.pem").write_bytes(signer.key_pem)
        self.index: dict[x509.Certificate, bool] = {}
        self.nmin = nmin
        self.requests = 0
        self.methods: list[str] = []
        self._lock = threading.Lock()
        responder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                self._answer(self.rfile.read(length), "POST")

            def do_GET(self) -> None:
                b64 = urllib.parse.unquote(self.path.rsplit("/", 1)[-1])
                self._answer(base64.b64decode(b64), "GET")

            def _answer(self, request: bytes, method: str) -> None:
                body = responder.respond(request, method)
                self.send_response(200 if body else 500)
                self.send_header("Content-Type", "application/ocsp-response")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self.server.serve_forever, name="ocsp-responder", daemon=True)

    def respond(self, request: bytes, method: str) -> bytes:
        with self._lock, tempfile.TemporaryDirectory(dir=self.dir) as tmp:
            index = Path(tmp) / "index.txt"
            index.write_text("".join(index_line(c, r) for c, r in self.index.items()))
            req, resp = Path(tmp) / "req.der", Path(tmp) / "resp.der"
            req.write_bytes(request)
            argv = [
                "openssl",
                "ocsp",
                "-index",
                str(index),
                "-CA",
                str(self.dir / "ca.pem"),
                "-rsigner",
                str(self.dir / "rsigner.pem"),
                "-rkey",
                str(self.dir / "rkey.pem"),
                "-reqin",
                str(req),
                "-respout",
                str(resp),
            ]
            if self.nmin is not None:
                argv += ["-nmin", str(self.nmin)]
            done = subprocess.run(argv, capture_output=True, timeout=20, check=False)
            if done.returncode != 0 or not resp.exists():
                return b""
            self.requests += 1
            self.methods.append(method)
            return resp.read_bytes()

    def __enter__(self) -> OCSPResponder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def openssl_response(
    workdir: Path,
    pki: PKI,
    cert: x509.Certificate,
    revoked: bool = False,
    signer: Issued | None = None,
    ndays: int = 7,
) -> bytes:
    """A DER response from openssl's responder, made offline (for ssl_multicert ssl_ocsp_name)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "leaf.pem").write_bytes(pem(cert))
    (workdir / "ca.pem").write_bytes(pki.ca.cert_pem)
    signer = signer or pki.ca
    (workdir / "rsigner.pem").write_bytes(signer.cert_pem)
    (workdir / "rkey.pem").write_bytes(signer.key_pem)
    (workdir / "index.txt").write_text(index_line(cert, revoked))
    subprocess.run(
        [
            "openssl",
            "ocsp",
            "-issuer",
            str(workdir / "ca.pem"),
            "-cert",
            str(workdir / "leaf.pem"),
            "-no_nonce",
            "-reqout",
            str(workdir / "req.der"),
        ],
        check=True,
        capture_output=True,
        timeout=20,
    )
    subprocess.run(
        [
            "openssl",
            "ocsp",
            "-index",
            str(workdir / "index.txt"),
            "-CA",
            str(workdir / "ca.pem"),
            "-rsigner",
            str(workdir / "rsigner.pem"),
            "-rkey",
            str(workdir / "rkey.pem"),
            "-reqin",
            str(workdir / "req.der"),
            "-respout",
            str(workdir / "resp.der"),
            "-ndays",
            str(ndays),
        ],
        check=True,
        capture_output=True,
        timeout=20,
    )
    return (workdir / "resp.der").read_bytes()


def crafted_response(
    pki: PKI,
    cert: x509.Certificate,
    this_update: datetime.datetime,
    next_update: datetime.datetime | None,
    *,
    status: str = "good",
    signer: Issued | None = None,
    extra_certs: list[x509.Certificate] | None = None,
) -> bytes:
    """A DER response built with cryptography, for the cases openssl's responder will not make
    (an expired one, a future one, an "unknown")."""
    from cryptography.x509 import ocsp

    signer = signer or pki.ca
    cert_status = {
        "good": ocsp.OCSPCertStatus.GOOD,
        "revoked": ocsp.OCSPCertStatus.REVOKED,
        "unknown": ocsp.OCSPCertStatus.UNKNOWN,
    }[status]
    revoked_at = this_update if status == "revoked" else None
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=cert,
            issuer=pki.ca.cert,
            algorithm=hashes.SHA1(),
            cert_status=cert_status,
            this_update=this_update,
            next_update=next_update,
            revocation_time=revoked_at,
            revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, signer.cert)
    )
    if extra_certs:
        builder = builder.certificates(extra_certs)
    return builder.sign(signer.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

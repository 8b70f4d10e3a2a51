"""OCSP stapling against the real tsproxy, seen by ``openssl s_client -status``.

The responder is openssl's own (tests/ocsp_pki.py); the prefetched files (``ssl_ocsp_name``)
are made by it too. Every check is what an operator or a client sees: the stapled response and
its status in s_client's output, handshakes that succeed with nothing stapled, the counters, and
``tsproxy config check`` errors.
"""

from __future__ import annotations

import datetime
import functools
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, run_tsproxy, write_config_dir
from conftest import wait_for as conftest_wait_for
from ocsp_pki import NOW, PKI, Issued, OCSPResponder, crafted_response, openssl_response, pem

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

HOST = "ocsp.test"
Factory = Callable[..., Any]
EX_CONFIG = 78


@pytest.fixture(scope="module")
def pki() -> PKI:
    return PKI()


def files_for(
    leaf: Issued, pki: PKI, ocsp_name: str | None = None, extra: dict[str, bytes] | None = None
) -> dict[str, str | bytes]:
    line = "dest_ip=* ssl_cert_name=leaf.pem ssl_key_name=leaf.key"
    if ocsp_name:
        line += f" ssl_ocsp_name={ocsp_name}"
    files: dict[str, str | bytes] = {
        "leaf.pem": leaf.cert_pem + pki.ca.cert_pem,  # the issuer in the chain file
        "leaf.key": leaf.key_pem,
        "ca.pem": pki.ca.cert_pem,
        "ssl_multicert.config": line + "\n",
    }
    files.update(extra or {})
    return files


def records(**extra: Any) -> dict[str, Any]:
    recs: dict[str, Any] = {
        "proxy.config.http.server_ports": "{0}:ssl:ip-in=127.0.0.1",
        "proxy.config.ssl.server.cert.path": ".",
        "proxy.config.ssl.server.private_key.path": ".",
        "proxy.config.ssl.ocsp.enabled": 1,
        "proxy.config.ssl.ocsp.update_period": 1,
    }
    recs.update({k.replace("__", "."): v for k, v in extra.items()})
    return recs


def metric(proxy: Any, name: str) -> int:
    out = proxy.ctl("metric", "get", "proxy.process.ssl." + name)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


wait_for = functools.partial(conftest_wait_for, timeout=20.0)  # OCSP fetches run on a thread pool


def s_client(proxy: Any, version: str = "-tls1_3", *extra: str) -> str:
    """``openssl s_client -status``: its whole output (the handshake must succeed)."""
    done = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{proxy.port(0)}",
            "-servername",
            HOST,
            "-status",
            "-CAfile",
            str(proxy.config_dir / "ca.pem"),
            "-verify_return_error",
            version,
            *extra,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "Verify return code: 0 (ok)" in out, out
    return out


def stapled_status(out: str) -> str | None:
    """``good`` / ``revoked`` when a verified response was stapled, None when none was sent."""
    if "OCSP response: no response sent" in out:
        return None
    assert "OCSP Response Status: successful" in out, out
    for line in out.splitlines():
        if "Cert Status:" in line:
            return line.split(":", 1)[1].strip()
    raise AssertionError(out)


@pytest.fixture
def responder(tmp_path: Path, pki: PKI) -> Iterator[OCSPResponder]:
    with OCSPResponder(tmp_path / "responder", pki) as r:
        yield r


# -- fetched from the AIA responder ----------------------------------------------------------------


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_response_from_the_aia_responder_is_verified_and_stapled(
    tsproxy_factory: Factory, pki: PKI, responder: OCSPResponder, version: str
) -> None:
    leaf = pki.issue(HOST, ocsp_url=responder.url)
    responder.index[leaf.cert] = False
    proxy = tsproxy_factory(records=records(), files=files_for(leaf, pki))
    wait_for(lambda: metric(proxy, "ssl_ocsp_refreshed_cert") >= 1, "a refreshed response")
    assert stapled_status(s_client(proxy, version)) == "good"
    assert stapled_status(s_client(proxy, version)) == "good"
    assert metric(proxy, "ssl_ocsp_stapled") == 2
    assert responder.requests == 1 and responder.methods == ["POST"]  # cached: one fetch
    # A reload keeps the cached response: still stapled, no new fetch.
    assert proxy.ctl("reload").returncode == 0
    assert stapled_status(s_client(proxy, version)) == "good"
    assert responder.requests == 1


def test_revoked_certificate_is_stapled_as_revoked_and_counted(
    tsproxy_factory: Factory, pki: PKI, responder: OCSPResponder
) -> None:
    leaf = pki.issue(HOST, ocsp_url=responder.url)
    responder.index[leaf.cert] = True
    proxy = tsproxy_factory(records=records(), files=files_for(leaf, pki))
    wait_for(lambda: metric(proxy, "ssl_ocsp_revoked_cert") >= 1, "a revoked response")
    assert stapled_status(s_client(proxy)) == "revoked"


def test_request_mode_get(tsproxy_factory: Factory, pki: PKI, responder: OCSPResponder) -> None:
    leaf = pki.issue(HOST, ocsp_url=responder.url)
    responder.index[leaf.cert] = False
    proxy = tsproxy_factory(
        records=records(proxy__config__ssl__ocsp__request_mode=1), files=files_for(leaf, pki)
    )
    wait_for(lambda: metric(proxy, "ssl_ocsp_refreshed_cert") >= 1, "a refreshed response")
    assert responder.methods == ["GET"]
    assert stapled_status(s_client(proxy)) == "good"


def test_refreshed_before_next_update(tsproxy_factory: Factory, pki: PKI, tmp_path: Path) -> None:
    """nextUpdate one minute out: the refresh is due update_period + request_timeout before it
    (here 1 + 57 s), long before cache_timeout (an hour), and the new response replaces the old."""
    with OCSPResponder(tmp_path / "r", pki, nmin=1) as responder:
        leaf = pki.issue(HOST, ocsp_url=responder.url)
        responder.index[leaf.cert] = False
        proxy = tsproxy_factory(
            records=records(proxy__config__ssl__ocsp__request_timeout=57), files=files_for(leaf, pki)
        )
        wait_for(lambda: metric(proxy, "ssl_ocsp_refreshed_cert") >= 1, "the first response")
        responder.index[leaf.cert] = True  # the next fetch learns of the revocation
        wait_for(lambda: metric(proxy, "ssl_ocsp_refreshed_cert") >= 2, "the refresh before nextUpdate")
        assert stapled_status(s_client(proxy)) == "revoked"
        assert metric(proxy, "ssl_ocsp_refresh_cert_failure") == 0


def test_rsa_and_ecdsa_certificates_of_one_line_each_staple_their_own(
    tsproxy_factory: Factory, pki: PKI, responder: OCSPResponder
) -> None:
    ecdsa = pki.issue(HOST, ocsp_url=responder.url)
    rsa = pki.issue(HOST, ocsp_url=responder.url, rsa_key=True)
    responder.index[ecdsa.cert] = False
    responder.index[rsa.cert] = True  # tell them apart by status
    files = files_for(ecdsa, pki)
    files.update({"rsa.pem": rsa.cert_pem + pki.ca.cert_pem, "rsa.key": rsa.key_pem})
    files["ssl_multicert.config"] = "dest_ip=* ssl_cert_name=leaf.pem,rsa.pem ssl_key_name=leaf.key,rsa.key\n"
    proxy = tsproxy_factory(records=records(), files=files)
    wait_for(lambda: metric(proxy, "ssl_ocsp_refreshed_cert") >= 2, "both responses")
    for version, sigalgs, status in (
        ("-tls1_3", "ecdsa_secp256r1_sha256", "good"),
        ("-tls1_3", "rsa_pss_rsae_sha256", "revoked"),
        ("-tls1_2", "ECDSA+SHA256", "good"),
        ("-tls1_2", "RSA+SHA256", "revoked"),
    ):
        assert stapled_status(s_client(proxy, version, "-sigalgs", sigalgs)) == status, (version, sigalgs)


# -- failures never fail a handshake ----------------------------------------------------------------


def test_response_signed_by_an_unauthorised_responder_is_not_stapled(
    tsproxy_factory: Factory, pki: PKI, tmp_path: Path
) -> None:
    rogue = PKI("Rogue CA").issue("rogue responder", ocsp_signing=True)
    with OCSPResponder(tmp_path / "r", pki, signer=rogue) as responder:
        leaf = pki.issue(HOST, ocsp_url=responder.url)
        responder.index[leaf.cert] = False
        proxy = tsproxy_factory(records=records(), files=files_for(leaf, pki))
        wait_for(lambda: metric(proxy, "ssl_ocsp_refresh_cert_failure") >= 1, "a failed refresh")
        assert responder.requests >= 1  # it answered; tsproxy refused what it said
        assert stapled_status(s_client(proxy)) is None
        assert metric(proxy, "ssl_ocsp_stapled") == 0 and metric(proxy, "ssl_ocsp_refreshed_cert") == 0


def test_unreachable_or_hanging_responder_never_holds_a_handshake(tsproxy_factory: Factory, pki: PKI) -> None:
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(8)  # accepts (in the kernel) and never answers
    held: list[socket.socket] = []
    stop = threading.Event()

    def keep() -> None:
        hang.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(hang.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=keep, daemon=True)
    thread.start()
    try:
        hanging = pki.issue(HOST, ocsp_url=f"http://127.0.0.1:{hang.getsockname()[1]}/")
        proxy = tsproxy_factory(
            records=records(proxy__config__ssl__ocsp__request_timeout=10), files=files_for(hanging, pki)
        )
        # The fetch is waiting on the silent responder (up to 10 s) while handshakes go on.
        assert stapled_status(s_client(proxy)) is None
        assert metric(proxy, "ssl_ocsp_refresh_cert_failure") == 0  # still waiting: not blocking us
        wait_for(lambda: metric(proxy, "ssl_ocsp_refresh_cert_failure") >= 1, "the request timeout")
        proxy.stop()
        closed = pki.issue(HOST, ocsp_url=f"http://127.0.0.1:{free_port()}/")
        proxy = tsproxy_factory(records=records(), files=files_for(closed, pki))
        wait_for(lambda: metric(proxy, "ssl_ocsp_refresh_cert_failure") >= 1, "a refused fetch")
        assert stapled_status(s_client(proxy)) is None
    finally:
        stop.set()
        thread.join(5)
        for s in held:
            s.close()
        hang.close()


# -- prefetched files (ssl_ocsp_name) ----------------------------------------------------------------


def test_prefetched_file_is_stapled_and_reread_when_it_changes(
    tsproxy_factory: Factory, pki: PKI, tmp_path: Path
) -> None:
    leaf = pki.issue(HOST)  # no AIA: the file is the only source
    good = openssl_response(tmp_path / "good", pki, leaf.cert)
    proxy = tsproxy_factory(
        records=records(proxy__config__ssl__ocsp__response__path="ocsp"),
        files=files_for(leaf, pki, "leaf.der", {"ocsp/leaf.der": good}),
    )
    assert stapled_status(s_client(proxy)) == "good"  # loaded with the config: stapled at once
    revoked = openssl_response(tmp_path / "revoked", pki, leaf.cert, revoked=True)
    target = proxy.config_dir / "ocsp" / "leaf.der"
    (proxy.config_dir / "ocsp" / "new.der").write_bytes(revoked)
    (proxy.config_dir / "ocsp" / "new.der").replace(target)
    wait_for(lambda: metric(proxy, "ssl_ocsp_revoked_cert") >= 1, "the re-read file")
    assert stapled_status(s_client(proxy)) == "revoked"


def test_ssl_ocsp_name_is_ignored_with_a_warning_when_ocsp_is_disabled(pki: PKI, tmp_path: Path) -> None:
    leaf = pki.issue(HOST)
    files = files_for(leaf, pki, "leaf.der", {"leaf.der": openssl_response(tmp_path / "r", pki, leaf.cert)})
    config_dir = write_config_dir(tmp_path / "etc", records(proxy__config__ssl__ocsp__enabled=0), files)
    result = run_tsproxy("config", "check", "--config-dir", str(config_dir))
    assert result.returncode == 0, result.stderr
    assert (
        "ssl_multicert.config:1: ssl_ocsp_name is ignored: proxy.config.ssl.ocsp.enabled is 0"
        in result.stderr
    )


def _check(tmp_path: Path, files: dict[str, str | bytes]) -> subprocess.CompletedProcess[str]:
    config_dir = write_config_dir(tmp_path / f"etc{len(list(tmp_path.iterdir()))}", records(), files)
    return run_tsproxy("config", "check", "--config-dir", str(config_dir))


def test_config_check_validates_ssl_ocsp_name_with_file_and_line(pki: PKI, tmp_path: Path) -> None:
    leaf, other = pki.issue(HOST), pki.issue("other.test")
    rogue = PKI("Rogue CA").issue("rogue responder", ocsp_signing=True)
    cases = {
        "No such file or directory": {},
        "not a DER OCSP response": {"leaf.der": b"this is not DER"},
        "the response is not about this certificate": {
            "leaf.der": openssl_response(tmp_path / "o", pki, other.cert)
        },
        "the responder certificate is not issued by the certificate's issuer": {
            "leaf.der": openssl_response(tmp_path / "g", pki, leaf.cert, signer=rogue)
        },
    }
    for needle, extra in cases.items():
        result = _check(tmp_path, files_for(leaf, pki, "leaf.der", extra))
        assert result.returncode == EX_CONFIG, (needle, result.stderr)
        assert "ssl_multicert.config:1: ssl_ocsp_name " in result.stderr and needle in result.stderr, (
            result.stderr
        )
        assert "Traceback" not in result.stderr
    # A response that expired is the file's age, not a config mistake: a warning, not stapled.
    expired = crafted_response(
        pki, leaf.cert, NOW - datetime.timedelta(days=8), NOW - datetime.timedelta(days=1)
    )
    result = _check(tmp_path, files_for(leaf, pki, "leaf.der", {"leaf.der": expired}))
    assert result.returncode == 0, result.stderr
    assert "expired (nextUpdate has passed); not stapled" in result.stderr
    # A certificate with neither source, or with no issuer at hand: warnings.
    lone = files_for(leaf, pki)
    lone["leaf.pem"] = pem(leaf.cert)
    result = _check(tmp_path, lone)
    assert result.returncode == 0 and "OCSP: no issuer certificate for leaf.pem" in result.stderr, (
        result.stderr
    )
    result = _check(tmp_path, files_for(leaf, pki))
    assert result.returncode == 0 and "names no OCSP responder (AIA)" in result.stderr, result.stderr
    # The issuer from ssl_ca_name serves as well as one in the chain file.
    with_aia = pki.issue(HOST, ocsp_url="http://127.0.0.1:9/")
    via_ca = files_for(with_aia, pki)
    via_ca["leaf.pem"] = pem(with_aia.cert)
    via_ca["ssl_multicert.config"] = (
        "dest_ip=* ssl_cert_name=leaf.pem ssl_key_name=leaf.key ssl_ca_name=ca.pem\n"
    )
    result = _check(tmp_path, via_ca)
    assert result.returncode == 0 and "OCSP" not in result.stderr, result.stderr

"""The sans-IO OCSP checks (iocore/net/tls/ocsp.py): what may be stapled, and why not."""

from __future__ import annotations

import datetime
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp
from ocsp_pki import NOW, PKI, crafted_response

from iocore.net.tls.ocsp import (
    OCSPError,
    OCSPExpired,
    OCSPUnknownCert,
    build_request,
    find_issuer,
    responder_url,
    verify_response,
)

DAY = datetime.timedelta(days=1)


@pytest.fixture(scope="module")
def pki() -> PKI:
    return PKI()


def test_responder_url_and_issuer(pki: PKI) -> None:
    leaf = pki.issue("a.test", ocsp_url="http://ocsp.example/")
    assert responder_url(leaf.cert) == "http://ocsp.example/"
    assert responder_url(pki.issue("b.test").cert) is None
    other = PKI("Other CA")
    same_name = PKI(pki.name)  # same subject, other key: must not be taken for the issuer
    assert find_issuer(leaf.cert, [other.ca.cert, same_name.ca.cert, pki.ca.cert]) == pki.ca.cert
    assert find_issuer(leaf.cert, [other.ca.cert, same_name.ca.cert]) is None


def test_request_names_the_certificate(pki: PKI) -> None:
    leaf = pki.issue("a.test")
    req = ocsp.load_der_ocsp_request(build_request(leaf.cert, pki.ca.cert))
    assert req.serial_number == leaf.cert.serial_number
    assert isinstance(req.hash_algorithm, hashes.SHA1)


def test_good_revoked_and_delegated_responses_verify(pki: PKI) -> None:
    leaf = pki.issue("a.test")
    now = time.time()
    good = verify_response(crafted_response(pki, leaf.cert, NOW, NOW + 7 * DAY), leaf.cert, pki.ca.cert, now)
    assert good.good and good.next_update is not None and good.next_update > now
    revoked = crafted_response(pki, leaf.cert, NOW, NOW + DAY, status="revoked")
    assert not verify_response(revoked, leaf.cert, pki.ca.cert, now).good
    delegate = pki.issue("responder", ocsp_signing=True)
    by_delegate = crafted_response(pki, leaf.cert, NOW, None, signer=delegate, extra_certs=[delegate.cert])
    resp = verify_response(by_delegate, leaf.cert, pki.ca.cert, now)
    assert resp.good and resp.next_update is None


def _reason(der: bytes, cert: x509.Certificate, issuer: x509.Certificate) -> str:
    with pytest.raises(OCSPError) as info:
        verify_response(der, cert, issuer, time.time())
    return info.value.reason


def test_every_reason_not_to_staple(pki: PKI) -> None:
    leaf, other = pki.issue("a.test"), pki.issue("b.test")
    rogue = PKI("Rogue CA")
    rogue_delegate = rogue.issue("rogue responder", ocsp_signing=True)
    no_eku = pki.issue("not a responder")
    assert "not a DER OCSP response" in _reason(b"\x30\x03junk", leaf.cert, pki.ca.cert)
    unauthorized = ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
    from cryptography.hazmat.primitives import serialization

    der = unauthorized.public_bytes(serialization.Encoding.DER)
    assert _reason(der, leaf.cert, pki.ca.cert) == "responder answered UNAUTHORIZED"
    fresh = crafted_response(pki, other.cert, NOW, NOW + DAY)
    assert _reason(fresh, leaf.cert, pki.ca.cert) == "the response is not about this certificate"
    # The same serial from another CA is still not about this certificate (issuer hashes differ).
    assert _reason(crafted_response(pki, leaf.cert, NOW, NOW + DAY), leaf.cert, rogue.ca.cert) == (
        "the response is not about this certificate"
    )
    by_rogue = crafted_response(pki, leaf.cert, NOW, NOW + DAY, signer=rogue.ca)
    assert (
        _reason(by_rogue, leaf.cert, pki.ca.cert)
        == "signed by neither the issuer nor a responder it authorised"
    )
    rogue_with_cert = crafted_response(
        pki, leaf.cert, NOW, NOW + DAY, signer=rogue_delegate, extra_certs=[rogue_delegate.cert]
    )
    assert "not issued by the certificate's issuer" in _reason(rogue_with_cert, leaf.cert, pki.ca.cert)
    without_eku = crafted_response(pki, leaf.cert, NOW, NOW + DAY, signer=no_eku, extra_certs=[no_eku.cert])
    assert "lacks the OCSPSigning" in _reason(without_eku, leaf.cert, pki.ca.cert)
    tampered = bytearray(crafted_response(pki, leaf.cert, NOW, NOW + DAY))
    tampered[-1] ^= 0x01  # the last byte of the signature
    assert _reason(bytes(tampered), leaf.cert, pki.ca.cert) in ("bad signature", "malformed response")
    future = crafted_response(pki, leaf.cert, NOW + DAY, NOW + 2 * DAY)
    assert _reason(future, leaf.cert, pki.ca.cert) == "thisUpdate is in the future"
    with pytest.raises(OCSPExpired):
        verify_response(
            crafted_response(pki, leaf.cert, NOW - 2 * DAY, NOW - DAY), leaf.cert, pki.ca.cert, time.time()
        )
    with pytest.raises(OCSPUnknownCert):
        verify_response(
            crafted_response(pki, leaf.cert, NOW, NOW + DAY, status="unknown"),
            leaf.cert,
            pki.ca.cert,
            time.time(),
        )


def test_clock_leeway(pki: PKI) -> None:
    leaf = pki.issue("a.test")
    der = crafted_response(pki, leaf.cert, NOW + datetime.timedelta(seconds=60), NOW + DAY)
    assert verify_response(der, leaf.cert, pki.ca.cert, NOW.timestamp()).good  # a minute ahead: fine

# Theory of operation
# -------------------
# The OCSP part of stapling that needs no network (RFC 6960, RFC 6066 section 8): where a
# certificate's responder is (its AIA extension), which certificate issued it, the DER request
# to send, and whether a DER response may be stapled. It is sans-IO: certificates and bytes in,
# a VerifiedResponse (or OCSPError saying why not) out; the fetching is iocore/net/ocsp_stapling.
#
# verify_response is the gate before a response reaches a client. It requires, in order:
# a SUCCESSFUL response; a single response for exactly this certificate (serial number and the
# issuer's name and key hashes, whatever hash the responder used); a signature by the issuer
# itself, or by a responder certificate the response carries that the issuer signed and that
# has the OCSPSigning extended key usage (RFC 6960 section 4.2.2.2); thisUpdate not in the
# future and nextUpdate not in the past (with SKEW seconds of clock leeway); and a status of
# good or revoked (an "unknown" answer is of no use to a client). Nothing else escapes: any
# parsing or signature problem is an OCSPError with a short reason.

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from iocore.net.tls.errors import TLSError

__all__ = [
    "SKEW",
    "OCSPError",
    "OCSPExpired",
    "OCSPUnknownCert",
    "VerifiedResponse",
    "build_request",
    "find_issuer",
    "responder_url",
    "verify_response",
]

SKEW = 300.0  # seconds of clock leeway on thisUpdate / nextUpdate (OpenSSL's -validity_period)


class OCSPError(TLSError):
    """A response that must not be stapled, or a certificate that cannot be; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class OCSPExpired(OCSPError):
    """A response past its nextUpdate: once good, now stale (a prefetched file not renewed)."""


class OCSPUnknownCert(OCSPError):
    """The responder answered "unknown" for the certificate."""


@dataclass(frozen=True, slots=True)
class VerifiedResponse:
    """A response that passed verify_response; times are POSIX seconds."""

    der: bytes
    good: bool  # False: the certificate is revoked (still worth stapling: it is the truth)
    this_update: float
    next_update: float | None  # None: the responder gives no bound (newer info always available)
    produced_at: float


def responder_url(cert: x509.Certificate) -> str | None:
    """The first OCSP responder URL of the certificate's Authority Information Access."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return None
    for desc in aia:
        if desc.access_method == AuthorityInformationAccessOID.OCSP and isinstance(
            desc.access_location, x509.UniformResourceIdentifier
        ):
            return str(desc.access_location.value)
    return None


def find_issuer(leaf: x509.Certificate, candidates: list[x509.Certificate]) -> x509.Certificate | None:
    """The candidate that signed ``leaf`` (its subject is the leaf's issuer and the signature
    checks), or None."""
    for cand in candidates:
        if cand.subject != leaf.issuer:
            continue
        try:
            leaf.verify_directly_issued_by(cand)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return cand
    return None


def build_request(cert: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """The DER OCSPRequest for one certificate (SHA-1 CertID, what every responder knows)."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER)


def _timestamp(value: datetime) -> float:
    return value.replace(tzinfo=UTC).timestamp() if value.tzinfo is None else value.timestamp()


def _verify_signature(
    key: object, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm | None
) -> None:
    if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
        key.verify(signature, data, padding.PKCS1v15(), algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
        key.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(key, dsa.DSAPublicKey) and algorithm is not None:
        key.verify(signature, data, algorithm)
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        key.verify(signature, data)
    else:
        raise OCSPError("unsupported responder signature algorithm")


def _key_hash(cert: x509.Certificate) -> bytes:
    """SHA-1 of the certificate's subjectPublicKey (RFC 6960 ResponderID byKey), as the
    CertID of a request names it."""
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, cert, hashes.SHA1()).build()
    return req.issuer_key_hash


def _names_responder(resp: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    if resp.responder_name is not None:
        return resp.responder_name == cert.subject
    return resp.responder_key_hash == _key_hash(cert)


def _signer(resp: ocsp.OCSPResponse, issuer: x509.Certificate) -> x509.Certificate:
    if _names_responder(resp, issuer):
        return issuer
    for cand in resp.certificates:
        if not _names_responder(resp, cand):
            continue
        try:
            cand.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise OCSPError("the responder certificate is not issued by the certificate's issuer") from None
        try:
            eku = cand.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is None or ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            raise OCSPError("the responder certificate lacks the OCSPSigning extended key usage")
        return cand
    raise OCSPError("signed by neither the issuer nor a responder it authorised")


def _matches(single: ocsp.OCSPSingleResponse, cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """The single response's CertID names this certificate (in the responder's hash)."""
    if single.serial_number != cert.serial_number:
        return False
    try:
        req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, single.hash_algorithm).build()
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return single.issuer_name_hash == req.issuer_name_hash and single.issuer_key_hash == req.issuer_key_hash


def verify_response(
    der: bytes, cert: x509.Certificate, issuer: x509.Certificate, now: float
) -> VerifiedResponse:
    """Check that ``der`` is a response fit to staple for ``cert`` at time ``now`` (see above)."""
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        raise OCSPError(f"not a DER OCSP response ({exc})") from None
    if resp.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OCSPError(f"responder answered {resp.response_status.name}")
    try:
        single = next((s for s in resp.responses if _matches(s, cert, issuer)), None)
        if single is None:
            raise OCSPError("the response is not about this certificate")
        signer = _signer(resp, issuer)
        try:
            _verify_signature(
                signer.public_key(), resp.signature, resp.tbs_response_bytes, resp.signature_hash_algorithm
            )
        except InvalidSignature:
            raise OCSPError("bad signature") from None
        this_update = _timestamp(single.this_update_utc)
        next_update = _timestamp(single.next_update_utc) if single.next_update_utc is not None else None
        produced_at = _timestamp(resp.produced_at_utc)
        status = single.certificate_status
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise OCSPError(f"malformed response ({exc})") from None
    if this_update > now + SKEW:
        raise OCSPError("thisUpdate is in the future")
    if next_update is not None and next_update < now - SKEW:
        raise OCSPExpired("expired (nextUpdate has passed)")
    if status is ocsp.OCSPCertStatus.UNKNOWN:
        raise OCSPUnknownCert("the responder does not know the certificate")
    return VerifiedResponse(der, status is ocsp.OCSPCertStatus.GOOD, this_update, next_update, produced_at)

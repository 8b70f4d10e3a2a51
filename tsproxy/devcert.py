# Theory of operation
# -------------------
# A development certificate so that "tsproxy" with an ssl port works out of the box.  On
# first start ensure_dev_certs() creates, under STATE_DIR/devcert/:
#
#   ca.pem          a self-signed development CA (trust it in your test client)
#   ca.key          its key (0600), kept so the server cert can be re-issued
#   server.pem      an ECDSA P-256 leaf for localhost, 127.0.0.1 and ::1, then the CA
#   server.key      the leaf's key (0600)
#
# Later starts reuse the files as long as they parse, the leaf matches its key, chains to
# the CA, and neither certificate expires within a day; otherwise everything is generated
# again.  Files are written to a temporary name and renamed, so a crash never leaves half
# a certificate.  Uses cryptography only (trustme is a test dependency).
#
# Started as root, this runs before the switch to proxy.config.admin.user_id, in a state
# directory that user may write to: devcert/ is opened with O_NOFOLLOW and every file in it
# read, created and renamed relative to that descriptor (tsproxy.safefs), so a link planted
# as devcert/ or inside it is never followed.  As root, devcert/ is kept owned by root (0755:
# the run user re-reads the certificate at reload but cannot change it); hand_over() gives
# server.key to the run user and ca.key stays root's.
"""Development CA and localhost server certificate for first starts."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iocore.records.errors import ConfigError, TSError
from tsproxy.safefs import open_dir, read_file, write_atomic

__all__ = ["dev_cert_files", "ensure_dev_certs", "hand_over"]

DIR_NAME = "devcert"
CA, CA_KEY, CERT, KEY = "ca.pem", "ca.key", "server.pem", "server.key"

_CA_DAYS = 3650
_LEAF_DAYS = 825
_MARGIN = datetime.timedelta(days=1)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _generate(dfd: int) -> None:
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tsproxy development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "tsproxy development CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=_LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    write_atomic(dfd, CA_KEY, _key_pem(ca_key), 0o600)
    write_atomic(dfd, KEY, _key_pem(key), 0o600)
    write_atomic(dfd, CA, ca_pem, 0o644)
    write_atomic(dfd, CERT, leaf.public_bytes(serialization.Encoding.PEM) + ca_pem, 0o644)


def _usable(dfd: int) -> bool:
    ca_pem, chain_pem, key_pem = (read_file(name, dfd) for name in (CA, CERT, KEY))
    if ca_pem is None or chain_pem is None or key_pem is None:
        return False  # missing, or a link / not a regular file: generated again (renamed over it)
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        chain = x509.load_pem_x509_certificates(chain_pem)
        key = serialization.load_pem_private_key(key_pem, None)
        leaf = chain[0]
        if key.public_key() != leaf.public_key():
            return False
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, IndexError, InvalidSignature):
        return False
    soon = datetime.datetime.now(datetime.UTC) + _MARGIN
    return all(c.not_valid_after_utc > soon for c in (ca, leaf))


def _open_devcert_dir(state_dir: Path) -> int:
    """A descriptor of state_dir/devcert (made when missing); a link there is refused."""
    directory = state_dir / DIR_NAME
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        sfd = open_dir(state_dir.resolve())
    except OSError as exc:
        raise ConfigError(str(state_dir), None, f"cannot create the state directory: {exc.strerror}") from exc
    try:
        try:
            os.mkdir(DIR_NAME, 0o755 if os.geteuid() == 0 else 0o700, dir_fd=sfd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(str(directory), None, f"cannot create: {exc.strerror}") from exc
        dfd = open_dir(DIR_NAME, sfd)  # a link there: UnsafePathError, naming it
    finally:
        os.close(sfd)
    if os.geteuid() == 0:
        # Root keeps devcert/ to itself (a directory an earlier version handed to the run
        # user is taken back): only root may change what root loads from it; 0755 so that
        # the run user can re-read the certificate at reload (earlier versions made it 0700).
        st = os.fstat(dfd)
        if st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o755:
            os.fchown(dfd, 0, 0)
            os.fchmod(dfd, 0o755)
    return dfd


@contextlib.contextmanager
def dev_cert_files(state_dir: Path) -> Iterator[tuple[Path, Path, Path]]:
    """Like ensure_dev_certs, but the chain and key paths go through a descriptor of devcert/
    held open inside the ``with`` block (``/proc/self/fd/N/server.pem``): loading them there
    reads the files just checked, even if devcert/ itself was swapped for a link meanwhile."""
    dfd = _open_devcert_dir(state_dir)
    try:
        if not _usable(dfd):
            try:
                _generate(dfd)
            except TSError as exc:
                raise ConfigError(
                    str(state_dir / DIR_NAME), None, f"cannot write the development certificate: {exc}"
                ) from exc
        held = Path(f"/proc/self/fd/{dfd}")
        yield state_dir / DIR_NAME / CA, held / CERT, held / KEY
    finally:
        os.close(dfd)


def ensure_dev_certs(state_dir: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server chain pem, server key pem) under state_dir/devcert, made when needed."""
    with dev_cert_files(state_dir):
        pass
    directory = state_dir / DIR_NAME
    return directory / CA, directory / CERT, directory / KEY


def hand_over(state_dir: Path, uid: int, gid: int) -> None:
    """Give devcert/server.key (if there) to the run user, which re-reads it at reload; the
    rest stays root's (ca.key 0600: the run user never sees the CA key)."""
    try:
        dfd = open_dir(state_dir / DIR_NAME)
    except TSError:
        return  # no development certificate in use
    try:
        try:
            fd = os.open(KEY, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == 0:
                os.fchown(fd, uid, gid)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)

"""TLS to origins: which client context, which SNI, and whether the origin's certificate passes
(ATS SSLInitClientContext, sslClientHandShakeEvent, verify_callback).

Theory of operation
-------------------
An ``https://`` remap target makes the HTTP state machine connect, then start the client
handshake (``ssl_start_handshake(SSL_EVENT_CLIENT)``) on the same event loop with the context and
SNI chosen here. The context comes from the ``proxy.config.ssl.client.*`` records; a remap rule
may override the verification policy (``@ssl_verify=``), the SNI (``@sni=``) and the client
certificate (``@client_cert=``). Contexts are built once per distinct combination and cached for
the life of the config snapshot.

SNI: ``proxy.config.ssl.client.sni_policy`` ``host`` sends the Host the origin is asked for,
``remap`` the remap target's host; either way never an IP literal (RFC 6066).

Verification, as the seed's ``verify_callback`` but after the handshake (pyOpenSSL resets the
recorded chain error when a Python verify callback accepts, so the chain result is read with
SSL_get_verify_result and the name is checked here, before any request byte is sent):

* SIGNATURE: the chain must verify against the client CA store;
* NAME: at depth 0, the SNI name against the DNS SANs (RFC 6125: one leftmost wildcard label,
  CN only without SANs), or without SNI the origin IP against the IP SANs;
* policy ENFORCED fails the transaction (502), PERMISSIVE counts and logs and goes on,
  DISABLED checks nothing.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from OpenSSL import SSL

from iocore.eventsystem.diags import DbgCtl
from iocore.net.ssl_config import SSLConfigParams, VerifyServerPolicy, VerifyServerProperties
from iocore.net.tls.context import build_client_context, verify_hostname, verify_ip, verify_result
from iocore.records.errors import ConfigError, TSError
from iocore.records.stats import METRIC_ID

if TYPE_CHECKING:
    from iocore.net.ssl_sni_config import SNIItem
    from tsproxy.remap import RemapResult

_dbg = DbgCtl("ssl.verify")

M_VERIFY_FAILED = METRIC_ID["proxy.process.ssl.origin_server_cert_verify_failed"]
M_UNKNOWN_CA = METRIC_ID["proxy.process.ssl.origin_server_unknown_ca"]
M_BAD_CERT = METRIC_ID["proxy.process.ssl.origin_server_bad_cert"]

# X509_V_ERR_* codes that mean "I do not know who signed this".
_UNKNOWN_CA_CODES = frozenset({2, 18, 19, 20, 21})
# Expired / not yet valid / bad signature / unusable.
_BAD_CERT_CODES = frozenset({4, 6, 7, 9, 10, 13, 14, 15, 16, 24, 26})


@dataclass(frozen=True, slots=True)
class OriginTLSSettings:
    """How to talk TLS to one origin: the context, the SNI and the policy."""

    ctx: SSL.Context
    sni: str | None
    policy: VerifyServerPolicy
    properties: VerifyServerProperties


@dataclass(frozen=True, slots=True)
class VerifyOutcome:
    ok: bool  # go on with the transaction
    reason: str | None = None  # why the certificate did not pass (also when PERMISSIVE let it go)
    metric: int | None = None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class OriginTLS:
    """Per worker and config snapshot: client contexts and origin certificate checks."""

    def __init__(self, params: SSLConfigParams, config_dir: Path) -> None:
        self.params = params
        self.config_dir = config_dir
        self._contexts: dict[tuple[VerifyServerPolicy, Path | None, Path | None], SSL.Context] = {}
        # Built now, https:// rule or not: a client key that does not match its certificate (or a
        # bad CA file) stops start-up and reloads, as ATS's SSLInitClientContext does.
        self._context(params.client_verify_policy, None, None)

    def _context(self, policy: VerifyServerPolicy, cert: Path | None, key: Path | None) -> SSL.Context:
        """The client context for a policy and a client certificate (None: the records')."""
        ck = (policy, cert, key)
        ctx = self._contexts.get(ck)
        if ctx is None:
            params = replace(self.params, client_verify_policy=policy)
            if cert is not None:
                params = replace(params, client_cert_filename=cert, client_private_key_filename=key)
            ctx = self._contexts[ck] = build_client_context(params)
        return ctx

    def _sni_client_cert(self, item: SNIItem) -> tuple[Path | None, Path | None]:
        """sni.yaml client_cert / client_key, relative to proxy.config.ssl.client.cert.path and
        .private_key.path (the key defaults to the certificate file)."""
        if item.client_cert is None:
            return None, None
        cert = self.params.client_cert_path / item.client_cert
        key = self.params.client_private_key_path / item.client_key if item.client_key else None
        return cert, key

    def check_sni_item(self, item: SNIItem) -> None:
        """Build now the client context an sni.yaml item asks for: a bad client_cert stops the
        load with the item's FILE:LINE."""
        if item.client_cert is None and item.verify_server_policy is None:
            return
        try:
            policy = item.verify_server_policy or self.params.client_verify_policy
            self._context(policy, *self._sni_client_cert(item))
        except TSError as exc:
            raise ConfigError(item.path, item.line, str(exc)) from exc

    def settings_for(self, remap: RemapResult, sni: SNIItem | None = None) -> OriginTLSSettings:
        """The context, SNI and policy for one origin connection. ``sni`` is the sni.yaml item
        the client connection matched: its verify_server_* and client_cert override the
        records; remap.config options (@ssl_verify, @client_cert) override both, as in ATS."""
        opts = remap.options
        policy = self.params.client_verify_policy
        properties = self.params.client_verify_properties
        cert: Path | None = None
        key: Path | None = None
        if sni is not None:
            policy = sni.verify_server_policy or policy
            properties = sni.verify_server_properties or properties
            cert, key = self._sni_client_cert(sni)
        verify = opts.get("ssl_verify")
        if verify is not None:
            policy = VerifyServerPolicy[verify.upper()]
        remap_cert = opts.get("client_cert")
        if remap_cert is not None:
            cert = Path(remap_cert)
            if not cert.is_absolute():
                cert = self.config_dir / cert
            key = None
        sni_name = opts.get("sni")
        if sni_name is None:
            # sni_policy (and sni.yaml client_sni_policy) "host" and "remap" name the same host
            # here: the remap target's. Even with url_remap.pristine_host_hdr (the origin gets the
            # client's Host) the SNI and the name check stay the target's, so pooled connections
            # (one pool per rule) stay right for every Host; a rule's @sni= names another.
            sni_name = remap.origin_host
        if _is_ip(sni_name):
            sni_name = None
        if sni_name is not None:
            try:
                sni_name.encode("idna")
            except UnicodeError:
                rule = remap.rule
                message = f"SNI {sni_name!r} is not a valid host name"
                raise ConfigError(rule.path, rule.line, message) from None
        return OriginTLSSettings(
            ctx=self._context(policy, cert, key),
            sni=sni_name,
            policy=policy,
            properties=properties,
        )

    def check(self, conn: SSL.Connection, settings: OriginTLSSettings, origin_ip: str) -> VerifyOutcome:
        """Apply the verification policy to a finished client handshake."""
        policy, props = settings.policy, settings.properties
        if policy is VerifyServerPolicy.DISABLED or props is VerifyServerProperties.NONE:
            return VerifyOutcome(True)
        reason: str | None = None
        metric: int | None = None
        if props in (VerifyServerProperties.SIGNATURE, VerifyServerProperties.ALL):
            code, text = verify_result(conn)
            if code != 0:
                reason = f"certificate verify failed: {text}"
                metric = (
                    M_UNKNOWN_CA
                    if code in _UNKNOWN_CA_CODES
                    else (M_BAD_CERT if code in _BAD_CERT_CODES else M_VERIFY_FAILED)
                )
        if reason is None and props in (VerifyServerProperties.NAME, VerifyServerProperties.ALL):
            cert = conn.get_peer_certificate()
            if cert is None:
                reason, metric = "origin sent no certificate", M_BAD_CERT
            elif settings.sni is not None:
                if not verify_hostname(cert, settings.sni):
                    reason, metric = f"certificate does not match host {settings.sni}", M_VERIFY_FAILED
            elif not verify_ip(cert, origin_ip):
                reason, metric = f"certificate does not match address {origin_ip}", M_VERIFY_FAILED
        if reason is None:
            _dbg("origin certificate ok (sni=%s ip=%s)", settings.sni, origin_ip)
            return VerifyOutcome(True)
        _dbg(
            "origin certificate check failed (%s, policy %s): %s",
            settings.sni or origin_ip,
            policy.value,
            reason,
        )
        return VerifyOutcome(policy is not VerifyServerPolicy.ENFORCED, reason, metric)

    @staticmethod
    def classify_handshake_failure(conn: SSL.Connection | None) -> tuple[str, int | None]:
        """A failed client handshake: the reason and counter, from the recorded verify result."""
        if conn is not None:
            code, text = verify_result(conn)
            if code != 0:
                metric = (
                    M_UNKNOWN_CA
                    if code in _UNKNOWN_CA_CODES
                    else (M_BAD_CERT if code in _BAD_CERT_CODES else M_VERIFY_FAILED)
                )
                return f"certificate verify failed: {text}", metric
        return "TLS handshake with the origin failed", None

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
from iocore.records.errors import ConfigError
from iocore.records.stats import METRIC_ID

if TYPE_CHECKING:
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
        self._contexts: dict[tuple[VerifyServerPolicy, str | None], SSL.Context] = {}
        # Built now, https:// rule or not: a client key that does not match its certificate (or a
        # bad CA file) stops start-up and reloads, as ATS's SSLInitClientContext does.
        self._context(params.client_verify_policy, None)

    def _context(self, policy: VerifyServerPolicy, client_cert: str | None) -> SSL.Context:
        key = (policy, client_cert)
        ctx = self._contexts.get(key)
        if ctx is None:
            params = replace(self.params, client_verify_policy=policy)
            if client_cert is not None:
                cert = Path(client_cert)
                if not cert.is_absolute():
                    cert = self.config_dir / cert
                params = replace(params, client_cert_filename=cert, client_private_key_filename=None)
            ctx = self._contexts[key] = build_client_context(params)
        return ctx

    def settings_for(self, remap: RemapResult) -> OriginTLSSettings:
        opts = remap.options
        policy = self.params.client_verify_policy
        verify = opts.get("ssl_verify")
        if verify is not None:
            policy = VerifyServerPolicy[verify.upper()]
        sni = opts.get("sni")
        if sni is None:
            # sni_policy "host" and "remap" name the same host here: the remap target's. Even with
            # url_remap.pristine_host_hdr (the origin gets the client's Host) the SNI and the name
            # check stay the target's, so pooled connections (one pool per rule) stay right for
            # every Host; a rule's @sni= names another.
            sni = remap.origin_host
        if _is_ip(sni):
            sni = None
        if sni is not None:
            try:
                sni.encode("idna")
            except UnicodeError:
                rule = remap.rule
                raise ConfigError(rule.path, rule.line, f"SNI {sni!r} is not a valid host name") from None
        return OriginTLSSettings(
            ctx=self._context(policy, opts.get("client_cert")),
            sni=sni,
            policy=policy,
            properties=self.params.client_verify_properties,
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

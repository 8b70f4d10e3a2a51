"""The ``proxy.process.ssl.*`` counters of the TLS handshake, as metric ids (one place).

The handshake machine names the counters a failure counts (its ``Fail`` command carries their
ids); the VC counts them and the success / timeout counters in its worker's counter array.
"""

from __future__ import annotations

from iocore.records.stats import process_metric


def ssl_metric(name: str) -> int:
    return process_metric("ssl", name)


M_ATTEMPTS_IN = ssl_metric("total_attempts_handshake_count_in")
M_SUCCESS_IN = ssl_metric("total_success_handshake_count_in")
M_SUCCESS_OUT = ssl_metric("total_success_handshake_count_out")
M_HS_TIME = ssl_metric("total_handshake_time")
M_ERROR_SSL = ssl_metric("ssl_error_ssl")
M_ERROR_SYSCALL = ssl_metric("ssl_error_syscall")
M_ERROR_ZERO_RETURN = ssl_metric("ssl_error_zero_return")
M_TIMEOUT = ssl_metric("ssl_handshake_timeout_in")
M_NO_CERT = ssl_metric("ssl_no_cert_context")
M_ALPN_NO_ENDPOINT = ssl_metric("ssl_alpn_no_endpoint")
M_UA_OTHER = ssl_metric("user_agent_other_errors")
M_UA_WRONG_VERSION = ssl_metric("user_agent_wrong_version")
M_UA_UNKNOWN_CA = ssl_metric("user_agent_unknown_ca")
M_UA_EXPIRED = ssl_metric("user_agent_expired_cert")
M_UA_BAD_CERT = ssl_metric("user_agent_bad_cert")
M_UA_DECRYPT = ssl_metric("user_agent_decryption_failed")
M_UA_VERIFY = ssl_metric("user_agent_cert_verify_failed")
M_TLSV12 = ssl_metric("ssl_total_tlsv12")
M_TLSV13 = ssl_metric("ssl_total_tlsv13")
M_TICKETS_VERIFIED = ssl_metric("total_tickets_verified")
M_SNI_IP_DENIED = ssl_metric("ssl_sni_ip_allow_denied")

# OpenSSL reason strings -> the user_agent_* counter they belong to (checked in order).
UA_ERROR_COUNTERS: tuple[tuple[str, int], ...] = (
    ("unsupported protocol", M_UA_WRONG_VERSION),
    ("wrong version", M_UA_WRONG_VERSION),
    ("version too low", M_UA_WRONG_VERSION),
    ("alert protocol version", M_UA_WRONG_VERSION),
    ("unknown ca", M_UA_UNKNOWN_CA),
    ("unable to get local issuer", M_UA_UNKNOWN_CA),
    ("certificate expired", M_UA_EXPIRED),
    ("certificate has expired", M_UA_EXPIRED),
    ("peer did not return a certificate", M_UA_BAD_CERT),
    ("bad certificate", M_UA_BAD_CERT),
    ("certificate verify failed", M_UA_VERIFY),
    ("decrypt", M_UA_DECRYPT),
    ("bad record mac", M_UA_DECRYPT),
)


def ssl_error_metrics(reason: str) -> tuple[int, int]:
    """ssl_error_ssl and the user_agent_* counter of an OpenSSL error text."""
    text = reason.lower()
    for needle, metric in UA_ERROR_COUNTERS:
        if needle in text:
            return M_ERROR_SSL, metric
    return M_ERROR_SSL, M_UA_OTHER

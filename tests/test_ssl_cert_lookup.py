"""SSLCertLookup: the name and address rules of ATS's certificate table."""

from __future__ import annotations

from iocore.net.ssl_cert_lookup import CertOpt, SSLCertContext, SSLCertLookup


def cc(source: str) -> SSLCertContext:
    return SSLCertContext(ctx=None, source=source)


def test_exact_case_and_trailing_dot() -> None:
    lookup = SSLCertLookup()
    a = cc("a")
    lookup.insert_name("WWW.Example.COM", a)
    assert lookup.find("www.example.com") is a
    assert lookup.find("WWW.EXAMPLE.COM.") is a
    assert lookup.find("example.com") is None


def test_wildcard_matches_one_label_only() -> None:
    lookup = SSLCertLookup()
    w, exact = cc("w"), cc("exact")
    lookup.insert_name("*.a.com", w)
    lookup.insert_name("special.a.com", exact)
    assert lookup.find("x.a.com") is w
    assert lookup.find("X.A.COM.") is w
    assert lookup.find("special.a.com") is exact  # exact wins over wildcard
    assert lookup.find("y.x.a.com") is None
    assert lookup.find("a.com") is None
    assert lookup.find(".a.com") is None


def test_non_leftmost_or_partial_star_is_not_a_wildcard() -> None:
    lookup = SSLCertLookup()
    lookup.insert_name("f*.b.com", cc("partial"))
    lookup.insert_name("www.*.c.com", cc("middle"))
    assert lookup.find("foo.b.com") is None
    assert lookup.find("www.x.c.com") is None


def test_duplicates_first_wins_with_warning() -> None:
    lookup = SSLCertLookup()
    first, second = cc("ssl_multicert.config:1"), cc("ssl_multicert.config:2")
    assert lookup.insert_name("dup.com", first) is None
    warning = lookup.insert_name("DUP.com", second)
    assert warning is not None and "ssl_multicert.config:2" in warning and "ssl_multicert.config:1" in warning
    assert lookup.insert_name("*.dup.com", first) is None
    assert lookup.insert_name("*.dup.com", second) is not None
    assert lookup.find("dup.com") is first and lookup.find("x.dup.com") is first
    assert len(lookup.warnings) == 2
    assert lookup.insert_name("dup.com", first) is None  # same context again: no warning


def test_addresses_port_then_ip_never_default() -> None:
    lookup = SSLCertLookup()
    ip, ip_port, v6 = cc("ip"), cc("ip_port"), cc("v6")
    lookup.insert_addr("10.0.0.1", None, ip)
    lookup.insert_addr("10.0.0.1", 8443, ip_port)
    lookup.insert_addr("[2001:db8::0001]", 443, v6)
    assert lookup.find_addr("10.0.0.1", 8443) is ip_port
    assert lookup.find_addr("10.0.0.1", 443) is ip
    assert lookup.find_addr("2001:db8::1", 443) is v6
    assert lookup.find_addr("2001:db8::1", 80) is None
    assert lookup.find_addr("10.0.0.2", 443) is None
    assert lookup.find_addr("not-an-ip", 443) is None
    assert lookup.insert_addr("10.0.0.1", 8443, cc("late")) is not None


def test_default_context_bootstrap_and_configured() -> None:
    lookup = SSLCertLookup()
    boot = lookup.default_context
    assert boot.ctx is None and boot.opt is CertOpt.NORMAL
    assert lookup.contexts == ()
    star = cc("star")
    assert lookup.set_default(star) is None
    assert lookup.default_context is star
    assert lookup.set_default(cc("again")) is not None
    assert lookup.contexts == (star, lookup.contexts[1]) and len(lookup) == 2


def test_contexts_listed_once_in_order() -> None:
    lookup = SSLCertLookup()
    a, b = cc("a"), cc("b")
    lookup.insert_name("a.com", a)
    lookup.insert_name("alt.a.com", a)
    lookup.insert_addr("10.0.0.1", None, b)
    assert lookup.contexts == (a, b)
    assert list(lookup) == [a, b]

"""Sans-IO tests of the request-target normalizer (tsproxy/http/path.py, issue 14 item 2):
bytes in, bytes out, and the shapes that must be refused."""

from __future__ import annotations

import itertools

import pytest

from tsproxy.http.path import TargetRefused, normalize_target


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # RFC 3986 5.2.4 examples and friends
        (b"/a/b/c/./../../g", b"/a/g"),
        (b"/pub/a/../b", b"/pub/b"),
        (b"/pub/./b", b"/pub/b"),
        (b"/pub/.", b"/pub/"),
        (b"/pub/..", b"/"),
        (b"/pub/a/..", b"/pub/"),
        (b"/.", b"/"),
        (b"/./", b"/"),
        # %2e is "." in any case and any mix
        (b"/pub/x/%2e%2e/y", b"/pub/y"),
        (b"/pub/x/%2E%2E/y", b"/pub/y"),
        (b"/pub/x/.%2e/y", b"/pub/y"),
        (b"/pub/x/%2e./y", b"/pub/y"),
        (b"/pub/x/%2E./y", b"/pub/y"),
        (b"/pub/%2e/y", b"/pub/y"),
        # the query string is never touched, even when it holds dot segments
        (b"/pub/x/../y?next=/../../etc&a=%2e%2e", b"/pub/y?next=/../../etc&a=%2e%2e"),
        (b"/pub/./?", b"/pub/?"),
        # empty segments are kept (RFC 3986), and ".." removes one of them
        (b"/a//../b", b"/a/b"),
        (b"/a/..//b", b"//b"),
        (b"/a//./b", b"/a//b"),
        # ordinary segments are kept byte for byte: no decoding, no re-encoding
        (b"/a%20b/../c%2Fd/%41", b"/c%2Fd/%41"),
        # absolute-form: only the path part
        (b"http://pfx.test/pub/../x?q=1", b"http://pfx.test/x?q=1"),
        (b"http://pfx.test:8080/a/./b", b"http://pfx.test:8080/a/b"),
    ],
)
def test_dot_segments_removed(target: bytes, expected: bytes) -> None:
    assert normalize_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        b"/",
        b"/index.html",
        b"/static/app.min.js?v=1.2",
        b"/a/.hidden/b",  # ".hidden" is an ordinary segment
        b"/a/.../b",  # so is "..."
        b"/a/..b/c",
        b"/a/b../c",
        b"/a/%2e%2e%2e/b",
        b"/a%2fb/c",  # an encoded slash outside a dot segment is the origin's business
        b"/a%5cb",
        b"/a\\b.txt",
        b"/a;v=1/b",
        b"/a//b",
        b"/x?/../..",
        b"/a%20b?c=%2e%2e",
        b"*",
        b"http://pfx.test",
        b"http://pfx.test?q=/../",
        b"",
    ],
)
def test_target_without_dot_segments_is_the_same_object(target: bytes) -> None:
    # Not merely equal: the client's bytes go on untouched and nothing is rebuilt.
    assert normalize_target(target) is target


@pytest.mark.parametrize(
    ("target", "why"),
    [
        (b"/..", "climbs"),
        (b"/../secret/", "climbs"),
        (b"/pub/../../secret/", "climbs"),
        (b"/pub/%2e%2e/%2e%2e/secret/", "climbs"),
        (b"/pub/.%2e/.%2E/secret", "climbs"),
        (b"/pub/%2E./..", "climbs"),
        (b"/a/../..", "climbs"),
        (b"http://pfx.test/../x", "climbs"),
        # a dot segment behind an encoded "/" or "\", or a literal "\"
        (b"/pub/..%2f..%2fsecret/", "encoded slash"),
        (b"/pub/..%2F..%2Fsecret/", "encoded slash"),
        (b"/pub/%2e%2e%2fsecret", "encoded slash"),
        (b"/pub/x%2f..", "encoded slash"),
        (b"/pub/..%5c..%5csecret", "encoded slash"),
        (b"/pub/..%5Csecret", "encoded slash"),
        (b"/pub/..\\..\\secret", "encoded slash"),
        (b"/pub\\..\\secret", "encoded slash"),
        (b"/pub/a%2f.", "encoded slash"),
        # a dot segment with parameters
        (b"/pub/..;/secret", "parameters"),
        (b"/pub/.;x/secret", "parameters"),
        (b"/pub/%2e%2e;jsessionid=1/secret", "parameters"),
    ],
)
def test_escapes_refused_with_400(target: bytes, why: str) -> None:
    with pytest.raises(TargetRefused) as info:
        normalize_target(target)
    assert info.value.status == 400
    assert why in info.value.reason


def test_result_never_has_a_dot_segment() -> None:
    # Whatever comes out, an origin normalizing it again (decoding %2e first) finds nothing to do.
    pieces = [b"a", b".", b"..", b"%2e", b"%2E%2e", b".%2e", b"", b"b.c"]
    for combo in itertools.product(pieces, repeat=4):
        target = b"/x/y/z/w/" + b"/".join(combo)
        try:
            out = normalize_target(target)
        except TargetRefused:
            continue
        decoded = out.replace(b"%2e", b".").replace(b"%2E", b".")
        assert all(seg not in (b".", b"..") for seg in decoded.split(b"/")), (target, out)
        assert out.startswith(b"/")

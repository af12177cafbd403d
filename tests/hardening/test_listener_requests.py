"""Issue 17, items 4 and 10: what the blob listener reads as a request.

Item 4: a GET whose body holds another request got two answers (the body was
parsed as the next request), which behind a connection-reusing TLS terminator
mixes up answers between clients. A request with a body (Content-Length,
chunked, behind ``Expect: 100-continue``) gets one registry-style refusal and
the connection is closed; pipelined requests without bodies get their answers
in order. Heads are bounded by hub_max_head_bytes (431) like the main port's.

Item 10: ``expires`` (and the signature) are read only as the mirror writes
them: ASCII digits without a leading zero, of bounded length (``int()`` reads
Arabic-Indic digits, and 5,000 digits dropped the connection without an
answer); anything else is a registry-style 403. A Range in other digits or of
any length is answered, never a dropped connection.
"""

from __future__ import annotations

import threading
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from .helpers import assert_registry_error
from .listener import cached_blob, connect, ended, listener_mirror, request
from .wire import Conn

HUGE = b"X-Junk: " + b"a" * (100 * 1024 * 1024) + b"\r\n"


@pytest.fixture(scope="module")
def mirror(upstream, cache_dir, tmp_path_factory):
    with listener_mirror(tmp_path_factory.mktemp("listener-requests"), upstream, cache_dir) as m:
        yield m


@pytest.fixture(scope="module")
def blob(mirror, upstream, tmp_path_factory):
    return cached_blob(mirror, upstream, tmp_path_factory.mktemp("listener-requests-blob"))


def conn(mirror) -> Conn:
    return Conn.to(mirror.listener_port)


@pytest.mark.parametrize("framing", ["content-length", "chunked", "expect-100"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_request_with_a_body_is_refused_and_its_body_never_answered(mirror, blob, framing, method):
    target = blob.target()
    smuggled = request(target, "Range: bytes=0-9")  # a whole request, as the body
    head = request(target, "Range: bytes=0-9", method=method)[:-2]  # without the blank line
    with conn(mirror) as c:
        r = c.exchange(method, head, smuggled, framing)
        if method == "GET":
            assert_registry_error(r, (400,), f"{method} with a {framing} body")
        assert r.status == 400, r.short()
        assert r.header("connection") == "close"
        assert c.closed_by_server(3), f"a second answer, or the connection kept open: {c.buf[:200]!r}"


def test_a_put_with_a_body_gets_405_and_a_close(mirror, blob):
    with conn(mirror) as c:
        r = c.exchange("PUT", request(blob.target(), "Range: bytes=0-9", method="PUT")[:-2], request(blob.target()))
        assert_registry_error(r, (405,), "PUT with a body")
        assert c.closed_by_server(3)


def test_pipelined_requests_get_their_answers_in_order(mirror, blob):
    target = blob.target()
    with conn(mirror) as c:
        c.send(request(target, "Range: bytes=0-9") + request(target, method="HEAD")
               + request(target, "Range: bytes=1000-1999") + request(target, "Range: bytes=-5", "Connection: close"))
        first, head, second, last = (c.read_response(m) for m in ("GET", "HEAD", "GET", "GET"))
        assert (first.status, first.body) == (206, blob.data[:10])
        assert head.status == 200 and head.header("content-length") == str(len(blob.data)) and head.body == b""
        assert (second.status, second.body) == (206, blob.data[1000:2000])
        assert (last.status, last.body) == (206, blob.data[-5:])
        assert c.closed_by_server(3)


def test_a_head_under_hub_max_head_bytes_is_served_and_one_over_gets_431(mirror, blob):
    """The default hub_max_head_bytes (64 KiB), as on the main port."""
    target = blob.target()
    with conn(mirror) as c:
        c.send(request(target, "Range: bytes=0-9", "X-Padding: " + "p" * 40_000))
        r = c.read_response()
        assert (r.status, r.body) == (206, blob.data[:10]), r.short()
    with conn(mirror) as c:
        c.send(request(target, "X-Padding: " + "p" * 70_000))
        assert_registry_error(c.read_response(), (431,), "a 70 kB head")
        assert c.closed_by_server(3)


def test_huge_heads_get_431_or_a_close_with_flat_memory(mirror, blob):
    target = blob.target()
    mirror.reset_peak_rss()
    before = mirror.peak_rss()
    answers: list[bytes] = []

    def send_huge() -> None:
        with connect(mirror.listener_port, timeout=15) as s:
            try:
                s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n".encode() + HUGE + b"\r\n")
            except OSError:
                pass  # closed by the mirror mid-send: expected
            answers.append(ended(s, 10)[1])

    threads = [threading.Thread(target=send_huge) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 4 and all(a.startswith(b"HTTP/1.1 431") or a == b"" for a in answers), answers
    assert (mirror.peak_rss() - before) / 1e6 < 50, f"peak RSS grew from {before / 1e6:.0f} MB"


def spelled(target: str, **changes: str) -> str:
    parts = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | changes
    return parts._replace(query=urlencode(query)).geturl()


ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
FULLWIDTH = str.maketrans("0123456789", "０１２３４５６７８９")


def test_expires_and_signature_are_read_only_as_the_mirror_writes_them(mirror, blob):
    target = blob.target()
    query = parse_qs(urlsplit(target).query)
    expires, signature = query["expires"][0], query["signature"][0]
    cases = {
        "leading zero": spelled(target, expires="0" + expires),
        "Arabic-Indic digits": spelled(target, expires=expires.translate(ARABIC_INDIC)),
        "fullwidth digits": spelled(target, expires=expires.translate(FULLWIDTH)),
        "a plus sign": spelled(target, expires="+" + expires),
        "spaces": spelled(target, expires=f" {expires} "),
        "5,000 digits": spelled(target, expires="9" * 5000),
        "an upper-case signature": spelled(target, signature=signature.upper()),
        "a non-ASCII signature": spelled(target, signature="é" * 64),
        "bytes that are no UTF-8": target.replace("signature=", "signature=%ff%fe"),
    }
    for case, url in cases.items():
        with conn(mirror) as c:
            c.send(request(url, "Connection: close"))
            r = c.read_response()
        assert_registry_error(r, (403,), case)
        assert r.json()["errors"][0]["code"] == "DENIED", case
    with conn(mirror) as c:  # and the URL as written still works
        c.send(request(target, "Range: bytes=0-9", "Connection: close"))
        assert c.read_response().body == blob.data[:10]


@pytest.mark.parametrize("value,status,part", [
    ("bytes=٠-٩", 200, slice(None)),  # not a Range it understands: ignored (RFC 9110)
    ("bytes=" + "9" * 5000 + "-", 416, None),
    ("bytes=0-" + "9" * 5000, 206, slice(None)),
    ("bytes=-" + "9" * 5000, 206, slice(None)),
])
def test_ranges_in_other_digits_or_of_any_length_are_answered(mirror, blob, value, status, part):
    with conn(mirror) as c:
        c.send(request(blob.target(), f"Range: {value}", "Connection: close"))
        r = c.read_response()
    assert r.status == status, (value[:20], r.short())
    if part is not None:
        assert r.body == blob.data[part]

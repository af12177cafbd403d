"""Which headers cross the mirror, in which direction."""

from __future__ import annotations

from collections.abc import Iterable

# RFC 9110 section 7.6.1, plus the proxy-only ones.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Never sent to a redirect target (a CDN or storage service): storage services
# reject a request carrying both a signed URL and an Authorization header
# ("Only one auth mechanism allowed"), and the client's credentials are for the
# registry alone.
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})

# Request headers the mirror sets itself.
_REQUEST_REPLACED = frozenset({"host", "content-length", ":authority"})


def decode_fields(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Header fields as str, byte for byte (latin-1), from mitmproxy or httpx."""
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]


def encode_fields(fields: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """The inverse of decode_fields: the bytes the fields arrived as."""
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields]


def _connection_tokens(fields: Iterable[tuple[str, str]]) -> set[str]:
    tokens: set[str] = set()
    for name, value in fields:
        if name.lower() == "connection":
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def end_to_end(fields: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers, including those a Connection header names."""
    fields = list(fields)
    drop = HOP_BY_HOP | _connection_tokens(fields)
    return [(k, v) for k, v in fields if k.lower() not in drop]


def upstream_request_headers(fields: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The client's headers as the registry should see them.

    Order and repetition are kept: registries pick the manifest type from all
    ``Accept`` headers, and losing one changes the answer.
    """
    return [(k, v) for k, v in end_to_end(fields) if k.lower() not in _REQUEST_REPLACED]


def without_credentials(fields: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers for a redirect target (a CDN or storage service) or the cache: no credentials."""
    return without(fields, CREDENTIAL_HEADERS)


def without(fields: Iterable[tuple[str, str]], names: Iterable[str]) -> list[tuple[str, str]]:
    drop = {n.lower() for n in names}
    return [(k, v) for k, v in fields if k.lower() not in drop]


def value_of(fields: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of a header, case-insensitively."""
    name = name.lower()
    return next((v for k, v in fields if k.lower() == name), None)

"""The mirror's own HTTP client for talking to registries and token services.

mitmproxy forwards blob bodies (it streams them); everything small the mirror
needs to look at or answer for (manifests, tag lists, tokens, error bodies,
redirect probes) goes through this client, so that every failure becomes a
registry error instead of mitmproxy's HTML error page.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import anyio
import certifi
import httpx

from .registry import headers as hdrs
from .registry.errors import RegistryError
from .upstream_bodies import IDLE_SECONDS, Body, BodyError, BodyFetcher, Interrupter, in_thread

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
DRAINED_BODY = 64 * 1024  # an unwanted answer body up to this size is read so its connection is reused
MAX_UPSTREAM_CONNECTIONS = 200  # at once, to every upstream together (connlimits.py counts their files)
# of which the downloads' own connections (upstream_bodies.py), idle ones included; the rest are httpx's
BODY_CONNECTIONS = 80


@dataclass
class Exchange:
    """One request of the mirror's client and what came back, for whoever watches (side flows)."""

    purpose: str
    method: str
    url: str
    request_headers: list[tuple[str, str]]
    request_body: bytes | None
    started: float = field(default_factory=time.time)
    status: int | None = None
    reason: str = ""
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_body: bytes | None = None  # None: not read here (streamed, or a blob)
    answered: float | None = None
    ended: float | None = None
    error: str | None = None


@dataclass
class Fetched:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    redirected_to: str | None = None  # host of the last redirect target, for logs

    def header(self, name: str) -> str | None:
        return hdrs.value_of(self.headers, name)


def make_ssl_context(insecure: bool, ca_file: str | None, ca_dir: str | None) -> ssl.SSLContext:
    """The same trust decisions mitmproxy makes for its own upstream connections."""
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if ca_file or ca_dir:
        return ssl.create_default_context(cafile=ca_file, capath=ca_dir)
    return ssl.create_default_context(cafile=certifi.where())


def redirect_target(base_url: str, location: str) -> str:
    """Resolve a Location header; only http(s) targets are ever followed."""
    target = urljoin(base_url, location.strip())
    parts = urlsplit(target)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RegistryError(502, "UNAVAILABLE", "upstream redirected to an unsupported location")
    return target


def describe_error(exc: Exception) -> RegistryError:
    """Map a transport failure to what the client is told (no URLs: they may be signed)."""
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, httpx.InvalidURL):
        return RegistryError(414, "UNSUPPORTED", f"request URL not acceptable: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        return RegistryError(504, "UNAVAILABLE", "upstream did not answer in time")
    if isinstance(exc, httpx.ConnectError):
        text = str(exc)
        if isinstance(exc.__cause__, ssl.SSLError) or "SSL" in text or "certificate" in text.lower():
            return RegistryError(502, "UNAVAILABLE", f"TLS handshake with upstream failed: {text}")
        return RegistryError(502, "UNAVAILABLE", f"upstream unreachable: {text}")
    if isinstance(exc, httpx.HTTPError):
        return RegistryError(502, "UNAVAILABLE", f"upstream connection failed: {type(exc).__name__}")
    if isinstance(exc, TimeoutError):
        return RegistryError(504, "UNAVAILABLE", "upstream did not answer in time")
    if isinstance(exc, BodyError):
        return RegistryError(502, "UNAVAILABLE", f"upstream connection failed: {exc}")
    if isinstance(exc, ssl.SSLError):
        return RegistryError(502, "UNAVAILABLE", f"TLS handshake with upstream failed: {exc}")
    if isinstance(exc, OSError):
        return RegistryError(502, "UNAVAILABLE", f"upstream unreachable: {exc}")
    raise exc


async def check_reachable(url: str, timeout: float) -> None:
    """Open (and close) a TCP connection to where a redirect points.

    A flow retargeted to a CDN is connected by mitmproxy itself, which answers a
    failure with an HTML error page; checking first lets the mirror answer with
    registry error JSON instead, at the cost of one handshake per blob.
    """
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, port), timeout)
    except TimeoutError as e:
        raise RegistryError(504, "UNAVAILABLE", "blob storage did not accept a connection in time") from e
    except OSError as e:
        raise RegistryError(502, "UNAVAILABLE", f"blob storage unreachable: {e.strerror or e}") from e
    writer.close()


class UpstreamClient:
    def __init__(
        self,
        verify: ssl.SSLContext,
        timeout: float,
        max_body: int,
        on_answer: Callable[[str, float], None] = lambda host, seconds: None,
        observer: Callable[[Exchange], None] = lambda exchange: None,
    ) -> None:
        self.max_body = max_body
        self.on_answer = on_answer  # (upstream host, seconds to its answer headers)
        self.observer = observer  # every exchange, once it is over (or its body left to the caller)
        # httpx logs every request URL at INFO: signed CDN URLs and token queries must
        # stay out of the log (the mirror writes its own lines, without them)
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._client = httpx.AsyncClient(
            verify=verify,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=MAX_UPSTREAM_CONNECTIONS - BODY_CONNECTIONS,
                                max_keepalive_connections=40, keepalive_expiry=IDLE_SECONDS),
            trust_env=False,  # never route through a proxy from the environment
        )
        # httpx adds Accept and Accept-Encoding of its own; the registry must see
        # exactly what the client asked for (Accept picks the manifest type, and a
        # compressed answer must only go to a client that asked for one).
        for name in ("accept", "accept-encoding"):
            del self._client.headers[name]
        self._client.headers["user-agent"] = "hub-rewrite"
        self.bodies = BodyFetcher(verify, timeout, BODY_CONNECTIONS)

    async def warm_up(self) -> None:
        """httpx's transport loads anyio's event-loop backend on its first request (about
        30 ms of imports): load it at start-up, not while the first client waits."""
        await anyio.sleep(0)

    async def aclose(self) -> None:
        await self._client.aclose()
        self.bodies.close()

    async def open_body(self, url: str, headers: list[tuple[str, str]], purpose: str = "", start: int = 0) -> Body:
        """A GET whose body a download's threads read (``upstream_bodies``): its head is in; the
        caller reads or closes it. ``start``: from that byte on (``Range``), to resume a download."""
        shown = [*headers, ("Range", f"bytes={start}-")] if start else headers  # as upstream_bodies sends it
        exchange = Exchange(purpose, "GET", url, shown, None)
        interrupter = Interrupter()
        started = time.monotonic()
        try:
            body = await in_thread(lambda: self.bodies.open(url, headers, interrupter, start), interrupter)
        except Exception as exc:
            error = describe_error(exc)
            exchange.error, exchange.ended = error.message, time.time()
            self.observer(exchange)
            raise error from exc
        self.on_answer(urlsplit(url).hostname or "", time.monotonic() - started)
        exchange.status, exchange.reason, exchange.response_headers = body.status, body.reason, body.headers
        exchange.answered = time.time()
        self.observer(exchange)
        return body

    async def send(
        self, method: str, url: str, headers: list[tuple[str, str]], content: bytes | None = None, purpose: str = ""
    ) -> httpx.Response:
        """One request, no redirects followed, body not yet read: the caller closes it (``aclose``)."""
        response, exchange = await self._send(method, url, headers, content, purpose)
        self.observer(exchange)
        return response

    async def _send(
        self, method: str, url: str, headers: list[tuple[str, str]], content: bytes | None, purpose: str
    ) -> tuple[httpx.Response, Exchange]:
        exchange = Exchange(purpose, method, url, headers, content)
        try:
            # as bytes: httpx refuses non-ASCII str header values a client may send
            request = self._client.build_request(method, url, headers=hdrs.encode_fields(headers), content=content)
            started = time.monotonic()
            response = await self._client.send(request, stream=True)
            self.on_answer(request.url.host, time.monotonic() - started)
        except Exception as exc:
            error = describe_error(exc)
            exchange.error, exchange.ended = error.message, time.time()
            self.observer(exchange)
            raise error from exc
        exchange.status, exchange.reason = response.status_code, response.reason_phrase
        exchange.response_headers, exchange.answered = hdrs.decode_fields(response.headers.raw), time.time()
        return response, exchange

    async def release(self, response: httpx.Response) -> None:
        """Close an answer whose body is not wanted. A small body is read first: httpcore pools
        a connection only once its answer was read whole, and closing it unread would cost the
        next request to that host a new TCP and TLS handshake (2 round trips)."""
        declared = response.headers.get("content-length", "")
        unread = not (response.is_stream_consumed or response.is_closed or response.request.method == "HEAD")
        if unread and declared.isdigit() and int(declared) <= DRAINED_BODY:
            try:
                async for _ in response.aiter_raw():
                    pass
            except httpx.HTTPError:
                pass  # closed below all the same
        await response.aclose()

    async def read_body(self, response: httpx.Response) -> bytes:
        """The raw (still content-encoded) body, refusing anything too big to buffer."""
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            raise RegistryError(502, "UNAVAILABLE", "upstream answer too large to relay")
        body = bytearray()
        try:
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > self.max_body:
                    raise RegistryError(502, "UNAVAILABLE", "upstream answer too large to relay")
        except RegistryError:
            raise
        except Exception as exc:
            raise describe_error(exc) from exc
        return bytes(body)

    async def fetch(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        content: bytes | None = None,
        follow_redirects: bool = True,
        purpose: str = "",
    ) -> Fetched:
        """A whole (small) exchange; redirects of GET/HEAD are followed without credentials."""
        redirected_to: str | None = None
        for _ in range(MAX_REDIRECTS + 1):
            response, exchange = await self._send(method, url, headers, content, purpose)
            try:
                location = response.headers.get("location")
                if (
                    follow_redirects
                    and method in ("GET", "HEAD")
                    and response.status_code in REDIRECT_STATUSES
                    and location
                ):
                    url = redirect_target(url, location)
                    headers = hdrs.without_credentials(headers)
                    redirected_to = urlsplit(url).hostname
                    purpose = f"{purpose}, redirect followed" if purpose else "redirect followed"
                    continue
                body = b"" if method == "HEAD" else await self.read_body(response)
                exchange.response_body = body
                return Fetched(response.status_code, exchange.response_headers, body, redirected_to)
            except RegistryError as e:
                exchange.error = e.message
                raise
            finally:
                exchange.ended = time.time()
                self.observer(exchange)
                await self.release(response)
        raise RegistryError(502, "UNAVAILABLE", "upstream redirected too many times")

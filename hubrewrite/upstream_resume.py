"""A blob body that survives a cut: when the connection to its source breaks in the middle,
the transfer goes on from the byte it reached, with a ``Range`` request.

On slow and filtered networks connections to a CDN are reset in the middle of large
transfers; without this, a 1 GiB layer cut at 95% failed for every client following its
download, and the next client started again at byte 0. ``Resuming`` is a source of a
download's bytes (``cache/blobwriter.Source``, read by the download's thread) wrapping the
first answer: when a read fails (the peer closed, reset, went silent for the upstream
timeout), it asks for the rest where it stopped and goes on reading, so whoever reads it
(the cache's ``Copy``, or a client's stream without a cache) sees one uninterrupted body.

Where the rest comes from is the ``Origin``'s business, decided in one place
(``Origin.next_url``, made by ``paths/origins.next_source``): the same URL while the source
takes it; a fresh redirect of the registry when the source refuses it with 403 (a signed URL
that expired), asked with the credentials the transfer was started with (the first client's
token: if that expired too, the registry refuses and the blob fails cleanly); for a registry
with several URLs, a fresh redirect of its next healthy URL when the source refuses a resume
(5xx, 429).

What a resume accepts: a ``206`` whose ``Content-Range`` is exactly the rest of the blob,
or a ``200`` with the whole blob (the source ignored ``Range``: the bytes up to the position
are read and dropped). Any other range or size, a ``404``, a ``416``, a second ``403`` end
the transfer (``Unresumable``); a ``5xx``, a ``429`` or a failed connection count as an
attempt. The bytes are never trusted for being ranged: the digest is checked over the
whole blob as before, so a source that serves other bytes on resume fails the blob.

Bounded: at most ``MAX_RESUMES`` resumes per transfer; the first after bytes came is made
at once (a reset connection), each further one without a byte in between waits
``FIRST_DELAY`` doubling up to ``MAX_DELAY``; and none once the transfer has gone the
upstream timeout (``Origin.patience``) without a byte since its first failure.

The reading thread blocks while the event loop makes the request (``open_body``: the side
flows show each resume, the log says one line per resume without the URL, the metrics count
it), so the thread never touches the loop's objects.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from urllib.parse import urlsplit

from .registry.errors import RegistryError
from .upstream_bodies import Body, BodyError

log = logging.getLogger("hub_rewrite")

MAX_RESUMES = 5  # per transfer: a source cut more often fails the blob
FIRST_DELAY, MAX_DELAY = 0.5, 4.0  # seconds before a resume that follows one that brought nothing
DISCARD_BUFFER = 1 << 20  # reading past the bytes a source that ignored Range sends again
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19})")


class Unresumable(BodyError):
    """The source's answer to a resume shows it cannot give the rest of this blob."""


class Refused(BodyError):
    """The source answered a resume with an error that may pass (5xx, 429): another attempt."""


@dataclass
class Origin:
    """Where a transfer's bytes come from now, and how to get them again after a cut."""

    url: str  # the source: the storage URL the registry redirected to, or the registry itself
    fetch: Callable[[str, int], Awaitable[Body]]  # GET url from byte n on (RegistryError when unreachable)
    # the one place that says where the next attempt goes (``paths/origins.next_source``): given
    # the URL that failed and why ("interrupted", "refused", "expired": a 403), the URL to try
    # next, or None when there is none; RegistryError when the registry refuses a fresh one
    next_url: Callable[[str, str], Awaitable[str | None]]
    patience: float  # seconds a transfer may go without a byte, from its first failure: the upstream timeout
    # counts each resume request: "interrupted" (the connection broke or went silent), "refused" (the
    # previous resume was answered 5xx or 429), "expired" (with a fresh URL after a 403)
    resumed: Callable[[str], None] = lambda reason: None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "?"


class Resuming:
    """A blob's bytes from its source, resumed where they stopped (``blobwriter.Source``).
    Made on the event loop; read by one thread; ``interrupt`` from any."""

    def __init__(self, body: Body, origin: Origin, name: str, loop: asyncio.AbstractEventLoop) -> None:
        if body.length is None:
            raise ValueError("a resumable body needs its length")
        self.body, self.origin, self.name, self.loop = body, origin, name, loop
        self.length = body.length
        self.position = 0  # bytes handed to the reader
        self.resumes = 0
        self._failing_since: float | None = None  # the first failure since the last byte came
        self._idle_failures = 0  # failures since the last byte came
        self._stopped = False
        self._lock = threading.Lock()
        self._task: asyncio.Task | None = None
        # the resumes' requests belong to the client flow this transfer was started for (side flows)
        self._context = contextvars.copy_context()

    def readinto(self, view: memoryview, flush_after: float) -> int:
        while True:
            try:
                n = self.body.readinto(view, flush_after)
            except OSError as e:
                if self._stopped or isinstance(e, Unresumable):
                    raise
                self.body.close()
                self._replace(self._resumed(e))
                continue
            if n:
                self.position += n
                self._failing_since, self._idle_failures = None, 0
            return n

    def interrupt(self) -> None:
        with self._lock:
            self._stopped = True
            body, task = self.body, self._task
        body.interrupt()
        if task is not None:
            try:
                self.loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass  # the loop is closed: nothing runs there any more

    def close(self) -> None:
        self.body.close()

    def _replace(self, body: Body) -> None:
        with self._lock:
            if self._stopped:
                body.close()
                raise BodyError("interrupted")
            self.body = body

    def _resumed(self, error: OSError) -> Body:
        """The rest of the blob from a new answer, or the error that ends the transfer."""
        while True:
            now = time.monotonic()
            self._failing_since = self._failing_since or now
            self._idle_failures += 1
            if self.resumes >= MAX_RESUMES or now - self._failing_since > self.origin.patience:
                raise BodyError(f"{_describe(error)}; not resumed again after {self.resumes} resumes") from error
            self.resumes += 1
            delay = 0.0 if self._idle_failures == 1 else min(FIRST_DELAY * 2 ** (self._idle_failures - 2), MAX_DELAY)
            try:
                body = self._on_loop(self._reopen(error, delay))
                if body.status == 200 and self.position:
                    self._skip(body)
                return body
            except Unresumable:
                raise
            except OSError as e:
                if self._stopped:
                    raise
                error = e

    def _skip(self, body: Body) -> None:
        """A source that ignored Range sends the blob from byte 0: read past what was read before."""
        scratch = memoryview(bytearray(min(DISCARD_BUFFER, self.position)))
        left = self.position
        try:
            while left:
                if self._stopped:
                    raise BodyError("interrupted")
                n = body.readinto(scratch[:min(left, len(scratch))], 1.0)
                if not n:
                    raise BodyError("the source ended before the position it resumes from")
                left -= n
        except BaseException:
            body.close()
            raise

    async def _reopen(self, error: OSError, delay: float) -> Body:
        if delay:
            await asyncio.sleep(delay)
        log.warning("blob %s: %s after %d of %d bytes from %s; resuming from byte %d (resume %d of %d)", self.name,
                    _describe(error), self.position, self.length, self.origin.host, self.position, self.resumes,
                    MAX_RESUMES)
        reason = "refused" if isinstance(error, Refused) else "interrupted"
        self.origin.resumed(reason)
        body = await self._fetch(await self._next(reason))
        if body.status == 403:
            log.warning("blob %s: %s refused the resume with 403 (an expired URL); asking for a fresh one",
                        self.name, self.origin.host)
            url = await self._next("expired")
            if url is not None:
                body.close()
                self.origin.resumed("expired")
                body = await self._fetch(url)
        return _checked(body, self.position, self.length)

    async def _next(self, reason: str) -> str | None:
        try:
            url = await self.origin.next_url(self.origin.url, reason)
        except RegistryError as e:
            raise Unresumable(f"the registry refused a fresh redirect: {e.message}") from e
        if url is not None:
            self.origin.url = url
        return url

    async def _fetch(self, url: str | None) -> Body:
        if url is None:
            raise Unresumable("no source left to resume from")
        try:
            return await self.origin.fetch(url, self.position)
        except RegistryError as e:
            raise BodyError(e.message) from e

    def _on_loop(self, coroutine: Coroutine[None, None, Body]) -> Body:
        """Run ``coroutine`` on the event loop and wait for it (from the reading thread)."""
        done = threading.Event()
        outcome: list = []

        def settle(task: asyncio.Task) -> None:
            error = BodyError("interrupted") if task.cancelled() else task.exception()
            body = None if error is not None else task.result()
            with self._lock:
                self._task = None
                if self._stopped and body is not None:
                    body.close()
                    body, error = None, BodyError("interrupted")
            outcome.append((body, error))
            done.set()

        def start() -> None:
            with self._lock:
                if self._stopped:
                    coroutine.close()
                    outcome.append((None, BodyError("interrupted")))
                    done.set()
                    return
                self._task = self.loop.create_task(coroutine, context=self._context)
            self._task.add_done_callback(settle)

        try:
            self.loop.call_soon_threadsafe(start)
        except RuntimeError:
            coroutine.close()
            raise BodyError("the mirror is shutting down") from None
        done.wait()
        body, error = outcome[0]
        if error is not None:
            raise error
        return body


def _checked(body: Body, position: int, size: int) -> Body:
    """The answer to a resume from ``position``, if it carries the rest of the blob."""
    status = body.status
    if status == 206:
        match = _CONTENT_RANGE.fullmatch((body.header("content-range") or "").strip())
        got = tuple(int(g) for g in match.groups()) if match else None
        if got == (position, size - 1, size) and body.length == size - position:
            return body
        body.close()
        raise Unresumable(f"the source answered the resume from byte {position} with the range "
                          f"{body.header('content-range')!r} of {body.length} bytes: not the rest of this blob")
    if status == 200 and body.length == size:
        return body  # Range ignored: the whole blob again, read past the position
    body.close()
    if status == 200:
        raise Unresumable(f"the source answered the resume with a body of {body.length} bytes, not {size}")
    if status in (408, 429) or status >= 500:
        raise Refused(f"the source answered the resume with {status} {body.reason}")
    raise Unresumable(f"the source answered the resume with {status} {body.reason}")


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "the source sent nothing for the upstream timeout"
    return str(error) or type(error).__name__

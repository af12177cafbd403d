"""The bounds and the bookkeeping of fetches made ahead of clients (``paths/ahead.py``).

Once a client got a manifest, the mirror fetches what it will ask for next
into the cache. Those fetches are nobody's request, so they are bounded: at
most PARALLEL at once (each holds its place until its download has ended), at
most MAX_BYTES of blobs queued or downloading, at most PER_CLIENT queued or
running for one client (its credentials and address) and MAX_FETCHES for all.
Beyond a bound a fetch is simply not made: the client asks for it itself.

Each fetch is known by what it fetches, so that a client asking for that very
thing while the fetch asks the upstream waits for it (``settled``) instead of
asking the upstream a second time; a fetch still waiting for its place is not
waited for.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

from ..util.bounded_dict import BoundedDict

log = logging.getLogger("hub_rewrite")

PARALLEL = 4  # fetches at once, each until its download has ended
MAX_BYTES = 2 << 30  # sizes of the blobs queued or downloading, all clients together
PER_CLIENT = 32  # fetches queued or running for one client
MAX_FETCHES = 256  # fetches queued or running, all clients together

Key = tuple[str, str]  # ("blob" or "manifest", digest)


class Fetch:
    """One fetch ahead of a client: ``begun`` is set while it asks the upstream, ``settled``
    once a client need not wait for it (its download started, or it ended)."""

    def __init__(self) -> None:
        self.begun = False
        self.settled = asyncio.Event()


class AheadFetches:
    def __init__(self) -> None:
        self._slots = asyncio.Semaphore(PARALLEL)
        self._fetches: dict[Key, Fetch] = {}
        self._per_client: Counter = Counter()
        self._bytes = 0
        self._tasks: set[asyncio.Task] = set()
        self._unasked = BoundedDict(10_000)  # digests downloaded ahead that no client asked for yet

    def downloaded(self, digest: str) -> None:
        """A fetch started this blob's download: the first client asking for it is its miss."""
        self._unasked.put(digest, True)

    def first_ask(self, digest: str) -> bool:
        """Is this the first client request for a blob downloaded ahead of it? (Its cache
        state is "miss": the bytes came from upstream for it, a moment earlier.)"""
        return self._unasked.pop(digest, None) is not None

    def submit(self, key: Key, client: tuple[str, str], size: int, work: Callable[[Fetch], Awaitable[None]]) -> bool:
        """Queue ``work(fetch)`` unless it is queued already or a bound says no."""
        if key in self._fetches or len(self._fetches) >= MAX_FETCHES or self._per_client[client] >= PER_CLIENT \
                or self._bytes + size > MAX_BYTES:
            return False
        fetch = self._fetches[key] = Fetch()
        self._per_client[client] += 1
        self._bytes += size
        task = asyncio.get_running_loop().create_task(self._run(key, client, size, fetch, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, key: Key, client: tuple[str, str], size: int, fetch: Fetch,
                   work: Callable[[Fetch], Awaitable[None]]) -> None:
        try:
            async with self._slots:
                fetch.begun = True
                await work(fetch)
        except Exception:  # a bug must not stop the other fetches, nor leave a client waiting
            log.exception("fetch ahead of a client: %s %s failed", *key)
        finally:
            fetch.settled.set()
            del self._fetches[key]
            self._per_client[client] -= 1
            if not self._per_client[client]:
                del self._per_client[client]
            self._bytes -= size

    async def settled(self, key: Key, timeout: float) -> None:
        """Until a fetch of ``key`` asking the upstream now has started its download or ended;
        at once if there is none (or it still waits for its place)."""
        fetch = self._fetches.get(key)
        if fetch is not None and fetch.begun and not fetch.settled.is_set():
            try:
                await asyncio.wait_for(fetch.settled.wait(), timeout)
            except TimeoutError:
                pass

    def in_flight(self) -> int:
        return len(self._fetches)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

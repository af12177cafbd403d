"""The rounds of prefetching: at start, then every ``hub_prefetch_interval``, one image at a time.

Processes sharing a bucket do a round once: the one that takes the round's lock
in the bucket (``BucketLocks``, as downloads do) does it and keeps the lock until
its next round; the others find it taken and leave the work to it (their
clients find the blobs, manifests and tag records in the bucket). A process
that stops lets the lock go; one that dies leaves it to expire an interval later.

A problem is logged once per image and cause, not every round, and once more
when the image is warm again; the status page and the metrics show every image's state.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..cache.bucket_errors import BucketError
from ..mirror import Mirror
from .listfile import Image, PrefetchSettings
from .tokens import ServerTokens
from .warm import Problem, Progress, Work, warm

log = logging.getLogger("hub_rewrite")

KEEP_LOCK_EVERY = 30.0  # seconds between two refreshes of the round's lock while it runs
# elsewhere: another process sharing the bucket keeps it warm
STATES = ("waiting", "checking", "warm", "failed", "refused", "elsewhere")


class Prefetcher:
    def __init__(self, settings: PrefetchSettings, mirror: Mirror) -> None:
        self.settings, self.mirror = settings, mirror
        self.progress = {image.name: Progress("refused", problem=image.refused) if image.refused else Progress()
                         for image in settings.images}
        self.round_note = "not started"  # what the last round did, for the status page
        self._logged: dict[str, str] = {}  # image -> the problem last logged for it
        self._holding = False  # the round's lock in the bucket is ours
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._holding:
            self._holding = False
            await self._lock_call("release_lock")

    async def _run(self) -> None:
        for image in self.settings.images:
            if image.refused:
                log.warning("hub_rewrite: prefetch: %s is not fetched: %s", image.text, image.refused)
        while True:
            try:
                await self._round()
            except Exception:  # a bug must not end the rounds
                log.exception("hub_rewrite: prefetch: the round failed")
            await asyncio.sleep(self.settings.interval)

    async def _round(self) -> None:
        if not await self._take_lock():
            self.round_note = f"done by another process sharing the bucket (checked {_clock()})"
            self.mirror.metrics.prefetch_rounds.labels("elsewhere").inc()
            for progress in self.progress.values():
                if progress.state != "refused":
                    progress.state = "elsewhere"
            self._show()
            return
        keeper = asyncio.get_running_loop().create_task(self._keep_lock())
        try:
            mirror = self.mirror
            tokens = ServerTokens(mirror.client, mirror.realms, mirror.settings.upstream_credentials,
                                  mirror.cache.access, mirror.metrics.prefetch_requests.labels("token").inc)
            for image in self.settings.images:
                if not image.refused:
                    await self._check(image, tokens)
        finally:
            keeper.cancel()
            await self._lock_call("refresh_lock", self._lock_ttl)  # held until this process's next round
        self.round_note = f"last round ended {_clock()}"
        self.mirror.metrics.prefetch_rounds.labels("done").inc()

    async def _check(self, image: Image, tokens: ServerTokens) -> None:
        progress = self.progress[image.name]
        known, progress.state = progress.digest, "checking"
        self._show()
        count = self.mirror.metrics.prefetch_requests
        try:
            if not self.mirror.settings.rules.permits(image.upstream.name, image.repository):
                raise Problem("refused by hub_allow/hub_deny")
            await warm(Work(image, self.mirror, tokens, progress, lambda kind: count.labels(kind).inc()))
        except Problem as e:
            self._failed(image, progress, str(e))
        except Exception as e:  # a bug: said once (with its traceback), the other images still checked
            self._failed(image, progress, f"internal error: {type(e).__name__}: {e}", bug=True)
        else:
            progress.state, progress.problem = "warm", ""
            if progress.digest != known:
                log.info("hub_rewrite: prefetch: %s is %s, %d blobs cached", image.name, progress.digest,
                         progress.cached)
            if self._logged.pop(image.name, None) is not None:
                log.info("hub_rewrite: prefetch: %s is warm again", image.name)
        finally:
            progress.checked_at = time.time()
            self._show()

    def _failed(self, image: Image, progress: Progress, problem: str, bug: bool = False) -> None:
        progress.state, progress.problem = "failed", problem
        if self._logged.get(image.name) != problem:
            (log.exception if bug else log.warning)("hub_rewrite: prefetch: %s: %s", image.name, problem)
            self._logged[image.name] = problem

    def _show(self) -> None:
        states = [p.state for p in self.progress.values()]
        for state in STATES:
            self.mirror.metrics.prefetch_images.labels(state).set(states.count(state))
        self.mirror.metrics.prefetch_pending_blobs.set(
            sum(p.blobs - p.cached for p in self.progress.values() if p.state == "checking"))

    # ---- the round's lock in the bucket ----------------------------------------

    @property
    def _lock_ttl(self) -> float:
        return min(self.settings.interval + KEEP_LOCK_EVERY, 86400)

    async def _take_lock(self) -> bool:
        """Is this round ours? Without a bucket, always; with one failing, too (twice beats never)."""
        if self.mirror.cache.shared is None:
            return True
        if self._holding and await self._lock_call("refresh_lock", self._lock_ttl) is not False:
            return True
        self._holding = await self._lock_call("try_lock", self._lock_ttl) is not False
        return self._holding

    async def _keep_lock(self) -> None:
        while True:
            await asyncio.sleep(KEEP_LOCK_EVERY)
            await self._lock_call("refresh_lock", self._lock_ttl)

    async def _lock_call(self, name: str, *args) -> bool | None:
        """A call on the bucket's locks in a thread; None if the bucket fails (said once)."""
        shared = self.mirror.cache.shared if self.mirror.cache else None
        if shared is None:
            return None
        try:
            return await asyncio.to_thread(getattr(shared.bucket.locks, name), self.settings.lock_name, *args)
        except BucketError as e:
            if self._logged.get("") != str(e):
                log.warning("hub_rewrite: prefetch: the round's lock in the bucket: %s", e)
                self._logged[""] = str(e)
            return None

    def facts(self) -> dict:
        """What the status page shows (observe/status_page.StatusFacts)."""
        rows = []
        for image in self.settings.images:
            p = self.progress[image.name]
            name = image.name + (f" ({', '.join(map(str, image.platforms))})" if image.platforms else "")
            rows.append((name, p.state, p.digest, p.cached, p.blobs, p.checked_at, p.problem))
        note = (f"{len(rows)} images from {self.settings.path}, checked every {self.settings.interval} s; "
                f"{self.round_note}")
        return {"prefetch_note": note, "prefetch": tuple(rows)}


def _clock() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

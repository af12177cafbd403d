"""An upstream answer a test feeds by hand, for a Download to take over."""

from __future__ import annotations

import queue


class _Feed:
    """``await feed.put(chunk)`` from the test's loop; None ends the answer."""

    def __init__(self) -> None:
        self.chunks: queue.SimpleQueue = queue.SimpleQueue()

    async def put(self, chunk: bytes | None) -> None:
        self.chunks.put(chunk)


class FedUpstream:
    """A source as Download.start takes it (``blobwriter.Source``), read by the download's
    thread, fed chunk by chunk by the test through ``queue``."""

    def __init__(self, size: int) -> None:
        self.length = size
        self.queue = _Feed()
        self.pending = b""
        self.ended = False

    def readinto(self, view: memoryview, flush_after: float) -> int:
        """One fed chunk (or what fits of it) at a time."""
        if not self.pending and not self.ended:
            chunk = self.queue.chunks.get()
            if isinstance(chunk, BaseException):
                raise chunk
            self.pending, self.ended = chunk or b"", chunk is None
        n = min(len(view), len(self.pending))
        view[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def interrupt(self) -> None:
        self.queue.chunks.put(ConnectionAbortedError("interrupted"))

    def close(self) -> None:
        pass

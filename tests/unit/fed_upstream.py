"""An upstream answer a test feeds by hand, for a Download to take over."""

from __future__ import annotations

import asyncio


class FedUpstream:
    """An upstream answer as Download.start takes it (httpx's shape), fed chunk by chunk by the test; None ends it."""

    def __init__(self, size: int) -> None:
        self.headers = {"content-length": str(size)}
        self.queue: asyncio.Queue = asyncio.Queue()

    async def aiter_raw(self):
        while (chunk := await self.queue.get()) is not None:
            yield chunk

    async def aclose(self) -> None:
        pass

"""A dictionary that forgets its oldest entries: memory for things clients can multiply."""

from __future__ import annotations

from collections import OrderedDict

MAX_ENTRIES = 100_000


class BoundedDict(OrderedDict):
    def __init__(self, limit: int = MAX_ENTRIES) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)

"""A blob being downloaded into the store: written to tmp/<hex>.download, committed only if verified."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from .digests import hex_of

if TYPE_CHECKING:
    from .store import Store


class BlobWriter:
    """Writes a blob being downloaded; commits it only if complete and verified."""

    def __init__(self, store: Store, digest: str) -> None:
        self.store = store
        self.digest = digest
        self.hex = hex_of(digest)
        self.path = store.download_path(digest)
        # unbuffered: every byte counted as written is in the file for followers to read
        self.file = open(self.path, "wb", buffering=0)
        self.hasher = hashlib.sha256()
        self.size = 0
        self.done = False

    def write(self, chunk: bytes) -> None:
        """Raises OSError when the disk refuses (full): the download then fails."""
        view = memoryview(chunk)
        try:
            while view:
                view = view[self.file.write(view):]
        except OSError as e:
            self.store.note_problem(e)
            raise
        self.hasher.update(chunk)
        self.size += len(chunk)

    def finish(self) -> bool:
        """Verify and commit; False (and nothing kept) if the bytes do not match the digest."""
        if self.done:
            return False
        self.done = True
        try:
            self.file.close()
        except OSError as e:
            self.store.note_problem(e)
            self.path.unlink(missing_ok=True)
            return False
        if self.hasher.hexdigest() != self.hex:
            self.path.unlink(missing_ok=True)
            return False
        return self.store.commit_blob(self.path, self.hex)

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self.file.close()
        except OSError:
            pass  # the bytes are thrown away anyway
        self.path.unlink(missing_ok=True)



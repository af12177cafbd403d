"""The mirror's own certificate (``--certs``), renewed without a restart.

certbot renews a certificate every 60 days and replaces its files; people
replace them by hand too. The mirror looks at each ``--certs`` file once a
minute and, on new client connections, at most once a second (a ``stat``), and
when one changed it serves the new certificate to new connections, on the
mirror's port (mitmproxy's certificate store: ``mitmseams/certificates.py``)
and on the blob listener (an ``ssl`` context swapped in by its SNI callback).
Connections already open keep the certificate they started with.

A changed file that does not hold a certificate and its key (half written, a
wrong key) changes nothing: the mirror goes on serving the previous
certificate and says so in one log line, and takes the file once it is whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import exceptions

from .mitmseams.certificates import certificate_entry, mitmproxy_certstore, replace_certificate

log = logging.getLogger("hub_rewrite")

CHECK_EVERY = 60.0  # seconds between two looks at the files while no client connects
CHECK_AT_MOST_EVERY = 1.0  # seconds: new connections look at most this often


@dataclass
class Watched:
    spec: str  # the host pattern of --certs spec=path ("*" when none was given)
    path: Path
    signature: tuple[int, int, int] | None  # (inode, mtime, size) of the file last looked at


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()  # follows symlinks: certbot's live/ names point at a new file on renewal
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def parse_specs(specs) -> list[Watched]:
    """``--certs`` values as mitmproxy reads them: ``[spec=]path``."""
    watched = []
    for value in specs:
        spec, sep, path = value.partition("=")
        if not sep:
            spec, path = "*", value
        path = Path(path).expanduser()
        watched.append(Watched(spec, path, _signature(path)))
    return watched


def server_context(path: Path, passphrase: bytes | None) -> ssl.SSLContext:
    """A TLS server context with the certificate in ``path``; raises OSError or ssl.SSLError."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(path, password=passphrase)
    return context


class CertificateRenewal:
    """Sub-addon: watches the ``--certs`` files and serves a renewed one."""

    def __init__(self) -> None:
        self.option: tuple[list[str], str] | None = None  # the certs option (and passphrase) in use
        self.watched: list[Watched] = []
        self.passphrase: bytes | None = None
        self.listener: ssl.SSLContext | None = None  # what the blob listener starts with (stable)
        self.current: ssl.SSLContext | None = None  # what its new connections get
        self.checked_at = 0.0
        self.chains: Path | None = None  # a directory of the renewed chains' certificates (no keys)
        self.task: asyncio.Task | None = None

    def use(self, specs, passphrase: str) -> None:
        """Take the ``certs`` option (mitmproxy has loaded the files itself). Raises OptionsError.

        The same option again changes nothing: the blob listener keeps its context (a new one
        would make the mirror rebuild its cache and listener)."""
        if (list(specs), passphrase) == self.option:
            return
        self.option = (list(specs), passphrase)
        self.watched = parse_specs(specs)
        self.passphrase = passphrase.encode() if passphrase else None
        self.listener = self.current = None
        if not self.watched:
            return
        first = self.watched[0]  # the blob listener serves the first one, as mitmproxy does without SNI
        try:
            self.current = server_context(first.path, self.passphrase)
            self.listener = server_context(first.path, self.passphrase)
        except (OSError, ssl.SSLError) as e:
            raise exceptions.OptionsError(f"certs {first.spec}={first.path}: {e}") from e
        self.listener.sni_callback = self._pick_context

    def _pick_context(self, ssl_object, server_name, context) -> None:
        self.check()
        ssl_object.context = self.current

    # ---- hooks -----------------------------------------------------------

    def running(self) -> None:
        if self.watched and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._every_minute())

    def client_connected(self, client) -> None:
        self.check()

    def done(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.chains is not None:
            shutil.rmtree(self.chains, ignore_errors=True)
            self.chains = None

    async def _every_minute(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY)
            self.check(force=True)

    # ---- renewal -----------------------------------------------------------

    def check(self, force: bool = False) -> None:
        """Look at the files (at most once a second unless forced); serve what changed and is whole."""
        now = time.monotonic()
        if not self.watched or (not force and now - self.checked_at < CHECK_AT_MOST_EVERY):
            return
        self.checked_at = now
        for watched in self.watched:
            signature = _signature(watched.path)
            if signature is not None and signature != watched.signature:
                watched.signature = signature
                self._renew(watched)

    def _renew(self, watched: Watched) -> None:
        try:
            pem = watched.path.read_bytes()
            entry = certificate_entry(pem, self.passphrase, self._chain_file(pem))
            context = server_context(watched.path, self.passphrase) if watched is self.watched[0] else None
        except (OSError, ValueError, ssl.SSLError) as e:
            log.warning("hub_rewrite: certificate %s changed but cannot be used (%s); still serving the previous one",
                        watched.path, getattr(e, "strerror", None) or e)
            return
        store = mitmproxy_certstore()
        if store is not None:
            replace_certificate(store, watched.spec, entry)
        if context is not None:
            self.current = context
        log.info("hub_rewrite: certificate %s renewed: serial %x, valid until %s", watched.path,
                 entry.cert.serial, entry.cert.notafter.strftime("%Y-%m-%d %H:%M UTC"))

    def _chain_file(self, pem: bytes) -> Path:
        """The chain's certificates (public) in a file of their own, never rewritten: mitmproxy
        reads the chain from it at handshakes, so a half-written --certs file is never read there."""
        if self.chains is None:
            self.chains = Path(tempfile.mkdtemp(prefix="hub-rewrite-chains-"))
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in x509.load_pem_x509_certificates(pem))
        path = self.chains / f"{hashlib.sha256(chain).hexdigest()[:32]}.pem"
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(chain)
            os.replace(tmp, path)
        return path

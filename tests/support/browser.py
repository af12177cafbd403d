"""Headless Chromium (Debian package ``chromium``) looking at a page, for tests.

    browser = Chromium(tmp_path)
    html = browser.dump_dom(url, wait_ms=5000)          # the DOM after scripts ran
    png = browser.screenshot(url, tmp_path / "ui.png", wait_ms=5000)

``wait_ms`` is Chromium's ``--virtual-time-budget``: the page's clock runs
(timers fire, fetches and websocket messages are waited for) until that much
virtual time has passed, then the DOM is dumped or the screenshot taken.  A
JavaScript app such as mitmweb's UI, which fills its flow list from a
websocket after the page loaded, needs it; a server-rendered page does not.

A URL may carry a secret (mitmweb's ``?token=``): it never appears in an
error message.  Every run gets a fresh profile, so no cookie carries over.
Skips the calling test when Chromium is not installed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

TIMEOUT = 120
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--hide-scrollbars",
]


class BrowserError(RuntimeError):
    pass


def screenshot_path(tmp_path: Path, name: str) -> Path:
    """Where a test puts a screenshot: $HUB_SCREENSHOT_DIR when set (to look at after the run), else tmp_path."""
    directory = Path(os.environ.get("HUB_SCREENSHOT_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory / name


def without_query(url: str) -> str:
    """The URL as it may be shown: no query (tokens), no user info."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""), parts.path, "", ""))


class Chromium:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("chromium")
        if binary is None:
            pytest.skip("chromium not installed (Debian package chromium)")
        self.binary = binary
        self.workdir = Path(workdir)
        self._runs = itertools.count()

    def _run(self, url: str, *args: str, wait_ms: int) -> subprocess.CompletedProcess:
        profile = self.workdir / f"chromium-profile-{next(self._runs)}"
        argv = [self.binary, *FLAGS, f"--user-data-dir={profile}", *args]
        if wait_ms:
            argv.append(f"--virtual-time-budget={wait_ms}")
        try:
            result = subprocess.run([*argv, url], capture_output=True, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BrowserError(f"chromium did not finish {without_query(url)} in {TIMEOUT}s") from None
        finally:
            shutil.rmtree(profile, ignore_errors=True)
        if result.returncode != 0:
            stderr = result.stderr.replace(url, without_query(url))[-2000:]
            raise BrowserError(f"chromium failed on {without_query(url)} ({result.returncode}):\n{stderr}")
        return result

    def dump_dom(self, url: str, *, size: tuple[int, int] = (1280, 800), wait_ms: int = 0) -> str:
        """The serialized DOM once the page loaded (and ``wait_ms`` of virtual time passed).
        ``size`` matters for apps that only render the rows in view (mitmweb's flow list)."""
        return self._run(url, "--dump-dom", f"--window-size={size[0]},{size[1]}", wait_ms=wait_ms).stdout

    def screenshot(self, url: str, path: Path, *, size: tuple[int, int] = (1280, 800), wait_ms: int = 0) -> Path:
        """A PNG of the page's viewport at ``size`` (width, height); returns ``path``."""
        path = Path(path)
        path.unlink(missing_ok=True)
        self._run(url, f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", wait_ms=wait_ms)
        if not path.exists():
            raise BrowserError(f"chromium wrote no screenshot of {without_query(url)}")
        return path

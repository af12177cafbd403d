"""skopeo, the real client most integration and hardening tests pull with."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping

import pytest

from tests.support.daemons import NO_NETWORK_ENV

SKOPEO_TIMEOUT = 300  # a 256 MiB image through a throttled CDN stays well within it


def skopeo(*args: str, env: Mapping[str, str] | None = None, timeout: float = SKOPEO_TIMEOUT,
           ) -> subprocess.CompletedProcess:
    """Run ``skopeo args...``, its output captured as text, with no standard input; skip the test
    where skopeo is not installed. ``env``: the whole environment; by default this process's with
    NO_NETWORK_ENV (a pull that tried the internet fails at once instead of hanging)."""
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo not installed (Debian package skopeo)")
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=dict(env) if env is not None else {**os.environ, **NO_NETWORK_ENV})

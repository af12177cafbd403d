"""Fixtures of the hardening suite.

Each module gets its own mirror (real mitmdump with the addon, a cache
directory and ``hub_upstream_timeout=3``) in front of the session-wide
Docker-Hub-shaped ``upstream`` (tests/conftest.py).  Around every test the
``keeps_serving`` fixture checks that the mirror answers a valid request
before and after, and that the test added no ``Traceback`` to its log.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from tests.support.mirror import Mirror
from tests.support.netns import PublicClient, available

from .helpers import ANSWERS, INDEX_ACCEPT, UPSTREAM_TIMEOUT, EvilListener, anonymous_token


def pytest_configure(config):
    # Run on its own, this suite does not need the standard set's 256 MiB layer
    # (it pushes its own big layer): a smaller one keeps the session setup short.
    # Run together with the other suites, the default stays.
    args = [str(a) for a in config.args]
    if args and all("hardening" in a for a in args):
        os.environ.setdefault("HUB_TEST_BIG_SIZE", str(4 * 1024 * 1024))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hardening-cache")


@pytest.fixture(scope="module")
def mirror(upstream, cache_dir, tmp_path_factory):
    options = {"hub_cache_dir": str(cache_dir), "hub_upstream_timeout": str(UPSTREAM_TIMEOUT)}
    with Mirror(tmp_path_factory.mktemp("hardening-mirror"), upstream, options=options) as m:
        yield m


@pytest.fixture(scope="module")
def public_client():
    """A client on a public address (a network namespace, tests/support/netns.py): the
    forward proxy treats it as the internet, which a faked peername could not show."""
    problem = available()
    if problem:
        pytest.fail(f"this test needs a network namespace: {problem}")
    with PublicClient() as client:
        yield client


@pytest.fixture(scope="module")
def evil():
    listener = EvilListener()
    try:
        yield listener
    finally:
        listener.close()


_TOKENS: dict[str, tuple[float, str]] = {}
_CHECKED: set[str] = set()


def healthy(mirror, upstream) -> str:
    """'' if the mirror serves a valid pull (GET /v2/, token, manifest), else why not."""
    try:
        r = httpx.get(f"{mirror.url}/v2/", timeout=15)
        if r.status_code != 401 or not r.headers.get("www-authenticate", "").startswith(f'Bearer realm="{mirror.url}/token"'):
            return f"GET /v2/ -> {r.status_code} {r.headers.get('www-authenticate')!r} {r.text[:200]}"
        # a token through the mirror now and then (every test would be slow); tests of the
        # token service check that path themselves
        issued, token = _TOKENS.get(mirror.url, (0.0, ""))
        if time.monotonic() - issued > 60:
            token = anonymous_token(mirror.url, "library/alpine")
            _TOKENS[mirror.url] = (time.monotonic(), token)
        r = httpx.get(f"{mirror.url}/v2/library/alpine/manifests/3.19", timeout=15,
                      headers=[("Authorization", f"Bearer {token}")] + [("Accept", a) for a in INDEX_ACCEPT])
        if r.status_code != 200 or r.headers.get("docker-content-digest") != upstream.images["library/alpine"]["digest"]:
            return f"GET manifest library/alpine:3.19 -> {r.status_code} {r.text[:200]}"
    except (httpx.HTTPError, AssertionError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


@pytest.fixture(autouse=True)
def keeps_serving(request, mirror, upstream):
    """Before and after each test: a valid pull works and no Traceback was logged."""
    if mirror.url not in _CHECKED:  # afterwards, the previous test's check stands
        problem = healthy(mirror, upstream)
        assert not problem, f"mirror not serving before the test: {problem}"
        _CHECKED.add(mirror.url)
    log_start = len(mirror.log_text())
    yield
    if request.module.__name__.endswith("test_faults"):
        try:
            upstream.clear_faults()  # the tests do so in finally; this is a safety net
        except Exception:
            pass
    problem = healthy(mirror, upstream)
    assert mirror.proc is not None and mirror.proc.poll() is None, "mitmdump exited"
    assert not problem, f"mirror not serving after the test: {problem}"
    new_log = mirror.log_text()[log_start:]
    assert "Traceback" not in new_log, "Traceback in the mirror log:\n" + traceback_summary(new_log)


def traceback_summary(log: str) -> str:
    """For each traceback: the log line before it and the exception it ended with."""
    lines = log.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or lines[j].startswith("Traceback")
                                      or lines[j].startswith("During handling") or not lines[j].strip()):
                j += 1
            before = lines[i - 1] if i else ""
            where = [l.strip() for l in lines[i:j] if l.strip().startswith("File ")][-1:]
            out.append(f"{before.strip()} -> {lines[j].strip() if j < len(lines) else '?'} (at {where[0] if where else '?'})")
    return "\n".join(out)


def pytest_terminal_summary(terminalreporter):
    if not ANSWERS:
        return
    terminalreporter.section("hardening: who answered each malformed request")
    for a in ANSWERS:
        terminalreporter.write_line(f"{a['case']:<48} {str(a['status']):>5}  {a['layer']:<22} {a.get('code', '')}")

"""``scripts/run`` as a user runs it, with the package index out of reach: once
``.venv`` is set up, a restart starts the mirror at once, without pip.

It runs in a scratch copy of the repository (tests/support/checkout.py) whose
``.venv`` is a hard-linked copy of the virtualenv running the tests, so neither
this checkout's nor anyone's shared ``.venv`` is touched.  That copy is marked
as set up with scripts/lib.sh's own ``write_venv_stamp``: what ``ensure_venv``
writes after a successful install (the copy holds exactly what that install
put there).  pip is kept off the network (no index, a dead index URL, no
configuration files), so any pip run fails; that it did not run at all shows
in three ways: no ``setup:`` line, the stamp unchanged, and the project's
``dist-info`` in ``.venv`` unchanged (pip reinstalls a local project on every run).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.checkout import STAMP, CheckoutError, scratch_checkout
from tests.support.ports import free_port

START_LIMIT = 10.0  # seconds from `scripts/run` to a listening mirror, .venv set up: about 0.8 s on a quiet
# machine; the limit is for a loaded one (parallel tests). "At once" is shown by what follows: no set-up line,
# no package index read (pip is offline here), nothing installed
OFFLINE_PIP = {
    "PIP_CONFIG_FILE": "/dev/null",
    "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
    "PIP_NO_INDEX": "1",
    "PIP_FIND_LINKS": "",
    "PIP_NO_CACHE_DIR": "1",
}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    try:
        return scratch_checkout(tmp_path_factory.mktemp("scripts") / "checkout")
    except CheckoutError as e:
        pytest.skip(str(e))


def lib_sh(checkout: Path, call: str, *args: str) -> subprocess.CompletedProcess:
    """Run one function of the checkout's scripts/lib.sh."""
    return subprocess.run(["bash", "-c", f'source scripts/lib.sh && {call} "$@"', "lib.sh", *args],
                          cwd=checkout, capture_output=True, text=True, timeout=60)


def install_marks(checkout: Path) -> dict[str, object]:
    """What a pip run would change: the stamp and the project's dist-info in .venv."""
    venv = checkout / ".venv"
    (dist_info,) = (venv / "lib").glob("python3*/site-packages/hub_rewrite-*.dist-info")
    stamp = venv / STAMP
    return {"stamp": stamp.read_bytes(), "stamp_mtime": stamp.stat().st_mtime_ns,
            "dist_info_mtime": dist_info.stat().st_mtime_ns}


def wait_listening(port: int, proc: subprocess.Popen, limit: float) -> float | None:
    """Seconds until the port accepts, or None if not within ``limit`` (or the process ended)."""
    start = time.monotonic()
    while time.monotonic() - start < limit and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return time.monotonic() - start
        except OSError:
            time.sleep(0.02)
    return None


def setup_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("setup:")]


@pytest.mark.parametrize("installed_extras", ["", "test"])
def test_restart_starts_at_once_without_the_package_index(checkout, upstream, tmp_path, installed_extras):
    stamped = lib_sh(checkout, "write_venv_stamp", installed_extras)
    assert stamped.returncode == 0, stamped.stderr
    before = install_marks(checkout)
    port = free_port()
    env = {**os.environ, **OFFLINE_PIP, "HUB_PORT": str(port), "HUB_UPSTREAM": upstream.api_url}
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        # as the README says; the test upstream's CA trusted the operator's way (extra arguments go to mitmdump)
        proc = subprocess.Popen(["scripts/run", "--set", f"ssl_verify_upstream_trusted_ca={upstream.ca_cert}"],
                                cwd=checkout, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        started = wait_listening(port, proc, START_LIMIT)
        output = log.read_text(errors="replace")
        assert started is not None, f"not listening within {START_LIMIT}s:\n{output[-3000:]}"
        # the addon answers: the upstream's challenge, its realm rewritten to the mirror's own /token
        response = httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=30)
        assert response.status_code == 401, response.text
        assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert f'realm="http://127.0.0.1:{port}/token"' in response.headers["www-authenticate"]
    finally:
        proc.send_signal(signal.SIGINT)  # scripts/run execs mitmdump: this is the mirror itself
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    output = log.read_text(errors="replace")
    assert setup_lines(output) == []
    assert install_marks(checkout) == before
    print(f"scripts/run listening after {started:.2f}s")


def test_changed_dependencies_are_installed(checkout):
    """The other side: with pyproject.toml changed, scripts/run goes to pip (which fails here: no index)."""
    assert lib_sh(checkout, "write_venv_stamp", "test").returncode == 0
    before = install_marks(checkout)
    pyproject = checkout / "pyproject.toml"
    original = pyproject.read_text()
    pyproject.write_text(original + "\n# a changed dependency\n")
    try:
        run = subprocess.run(["scripts/run"], cwd=checkout, capture_output=True, text=True,
                             timeout=120, env={**os.environ, **OFFLINE_PIP, "HUB_PORT": str(free_port())})
    finally:
        pyproject.write_text(original)
    assert run.returncode != 0
    assert setup_lines(run.stderr) == ["setup: installing hub-rewrite and its dependencies into .venv"]
    assert install_marks(checkout) == before  # a failed install leaves the stamp alone: the next start tries again


@pytest.mark.parametrize(("installed", "requested", "up_to_date"), [
    ("", "", True), ("test", "", True), ("test", "test", True), ("", "test", False),
])
def test_stamp_covers_the_requested_extras(checkout, installed, requested, up_to_date):
    assert lib_sh(checkout, "write_venv_stamp", installed).returncode == 0
    assert (lib_sh(checkout, "venv_up_to_date", requested).returncode == 0) is up_to_date


def test_no_stamp_means_install(checkout):
    (checkout / ".venv" / STAMP).unlink(missing_ok=True)
    assert lib_sh(checkout, "venv_up_to_date", "").returncode == 1

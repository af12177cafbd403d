"""Commands run as a user types them: the text goes to ``bash -c`` in a directory.

    shell = Shell(checkout, env)                    # cwd and environment of every command
    done = shell.run("cat a.pem b.pem > c.pem")     # CompletedProcess, output captured
    with shell.start(".venv/bin/mitmdump ...", log_path, ports=[port]) as proc:
        proc.log_text()                             # what the command printed so far

``start`` runs a long-lived command (a mirror, or a loop that starts several
in the background) in a session of its own and waits until every port in
``ports`` accepts connections and ``ready_text`` (if any) has been printed as
often as asked.  ``stop()`` ends the whole process group (SIGINT, then SIGTERM,
then SIGKILL): background jobs of the command included, and only those.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.common import read_log, set_pdeathsig


# mitmweb prints its UI's URL with the login token; failure reports show the log without it
LOGIN_TOKEN = re.compile(r"([?&]token=)[^\s&\"']+")


class ShellError(RuntimeError):
    pass


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class Shell:
    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = Path(cwd)
        self.env = dict(env)

    def run(self, text: str, *, env: dict[str, str] | None = None, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", text], cwd=self.cwd, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def start(self, text: str, log_path: Path, *, ports: list[int], env: dict[str, str] | None = None,
              ready_text: str = "", ready_count: int = 1, timeout: float = 30) -> Background:
        return Background(["bash", "-c", text], self.cwd, {**self.env, **(env or {})}, log_path).wait_ready(
            ports, ready_text, ready_count, timeout)


class Background:
    """A command started in its own session, output to a log file."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:
            # the group leader dies with us; background jobs it starts are ended by stop()
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=set_pdeathsig)
        self.pgid = self.proc.pid

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self, ports: list[int], ready_text: str, ready_count: int, timeout: float) -> Background:
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None and not self.group_alive():
                    raise ShellError(f"exited with {self.proc.returncode}:\n{self.log_tail()}")
                if all(accepts(p) for p in ports) and self.log_text().count(ready_text) >= ready_count:
                    time.sleep(0.3)  # a mitmproxy script's configure() runs right after it is loaded
                    return self
                time.sleep(0.1)
            raise ShellError(f"not ready after {timeout}s:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self) -> None:
        for sig, wait in ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.proc.poll() is None:
                    time.sleep(0.05)
                    continue
                if not self.group_alive():
                    return
                time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.wait(5)

    def log_text(self) -> str:
        return read_log(self.log_path)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the log for a failure report, without mitmweb's login token."""
        return LOGIN_TOKEN.sub(r"\1***", self.log_text()[-chars:])

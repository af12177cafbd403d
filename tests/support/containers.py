"""The container image built from the repository's Containerfile, without a registry, and podman to run it.

    engine = Engine(workdir)                 # podman with the tests' own storage and configuration
    engine.run("podman images")              # a command as a user types it, in that environment
    build = ImageBuild(engine, workdir, command)
    build.start()                            # in the background (nice 19): the base, the wheels, the build
    build.result()                           # waits; raises ImageBuildError with the log

``podman`` and its users read their storage and settings from the files the
``CONTAINERS_*`` variables name, so every command runs as the README types it
while the tests' images and containers live in a directory of their own
(never the machine's ``/var/lib/containers``). The settings say what this
kind of machine needs: the ``runc`` runtime (``crun`` refuses the hybrid
cgroup layout here), ``cgroupfs``, file events, CNI (no netavark, no
iptables: containers use ``--network host``, as the README does), and
default ulimits within the machine's hard limits (podman's defaults are above
them and ``runc`` then fails to start the container). ``configure`` hands every
container more (``[containers] env`` and ``volumes``): the test upstream's URL in
place of Docker Hub's, and its CA's certificate.

The image: ``FROM docker.io/library/debian:trixie-slim`` needs Docker Hub.
Instead the base is a Debian trixie root file system made by ``mmdebstrap``
from Debian's archive with the slim image's settings (minbase, no manuals or
docs, no translations), imported with ``podman import`` and given to the
README's build command as ``--from``; pip reads a wheel directory made
beforehand by the tests' own pip (``PIP_NO_INDEX``/``PIP_FIND_LINKS`` build
arguments, the directory mounted with ``-v``). Every other step is the
Containerfile's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.mirror import REPO_ROOT

DEBIAN = "http://deb.debian.org/debian"
SUITE = "trixie"
BASE_IMAGE = "localhost/hub-rewrite-test-base:trixie"
# what debuerreotype does for debian:trixie-slim, as mmdebstrap options
SLIM = ["--variant=minbase", "--dpkgopt=force-unsafe-io", "--aptopt=Acquire::Languages \"none\"",
        *[f"--dpkgopt=path-exclude=/usr/share/{p}/*" for p in ("man", "doc", "info", "locale", "groff", "lintian")],
        "--dpkgopt=path-include=/usr/share/doc/*/copyright", "--dpkgopt=path-include=/usr/share/locale/locale.alias"]
NICE = ["nice", "-n", "19", "ionice", "-c", "2", "-n", "7"]  # the build runs beside other tests


class ImageBuildError(RuntimeError):
    pass


class Engine:
    """podman with storage, run and configuration files of its own (see the module docstring)."""

    def __init__(self, workdir: Path, keep: bool = False, short: Path | None = None) -> None:
        """``keep``: storage kept between test runs (its run directory then has a fixed name too);
        ``short``: the run directory of an engine another process made on this storage."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        # podman refuses a runroot longer than 50 characters: pytest's tmp paths are too long
        if short is not None:
            self.short = short
        elif keep:
            self.short = Path("/tmp") / f"hub-ctr-keep-{hashlib.sha256(str(workdir).encode()).hexdigest()[:8]}"
            self.short.mkdir(mode=0o700, exist_ok=True)
        else:
            self.short = Path(tempfile.mkdtemp(prefix="hub-ctr-", dir="/tmp"))
        self.configure({})

    def configure(self, extra_env: dict[str, str], volumes: dict[Path, str] | None = None) -> None:
        """Write podman's files; ``extra_env`` and ``volumes`` (host file -> container path, read-only)
        are given to every container."""
        w = self.workdir
        for d in ("storage", "networks", "tmp"):
            (w / d).mkdir(exist_ok=True)
        (w / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\nrunroot = "{self.short / "run"}"\ngraphroot = "{w / "storage"}"\n')
        env_list = ", ".join(f'"{k}={v}"' for k, v in extra_env.items())
        volume_list = ", ".join(f'"{host}:{inside}:ro"' for host, inside in (volumes or {}).items())
        (w / "containers.conf").write_text(
            "[containers]\n"
            f"env = [{env_list}]\nvolumes = [{volume_list}]\n"
            'default_ulimits = ["nofile=4096:4096", "nproc=16384:16384"]\n'
            "[engine]\n"
            'runtime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'events_logfile_path = "{w / "events.log"}"\ntmp_dir = "{self.short / "libpod"}"\n'
            "[network]\n"
            f'network_backend = "cni"\nnetwork_config_dir = "{w / "networks"}"\n')
        (w / "registries.conf").write_text("unqualified-search-registries = []\n")

    @property
    def env(self) -> dict[str, str]:
        w = self.workdir
        return {**os.environ, "CONTAINERS_STORAGE_CONF": str(w / "storage.conf"),
                "CONTAINERS_CONF": str(w / "containers.conf"),
                "CONTAINERS_REGISTRIES_CONF": str(w / "registries.conf"), "TMPDIR": str(w / "tmp")}

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise ImageBuildError(f"podman {' '.join(args)}: {done.stderr[-3000:]}")
        return done

    def close(self) -> None:
        """Every container of this storage removed, its mounts undone, its files deleted."""
        self.podman("rm", "--all", "--force", "--time", "0", timeout=120, check=False)
        self.podman("system", "reset", "--force", timeout=120, check=False)
        shutil.rmtree(self.short, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def dependencies() -> list[str]:
    """The project's dependencies (pyproject.toml), and what builds it (setuptools)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return [*project["project"]["dependencies"], *project["build-system"]["requires"]]


@dataclass
class ImageBuild:
    """The Containerfile built into ``engine``'s storage by ``command`` (the README's build command,
    with ``--from`` and the wheel arguments the tests add), in a thread of its own."""

    engine: Engine
    workdir: Path
    command: str
    steps: dict[str, float] = field(default_factory=dict)  # what took how long, seconds
    log: list[str] = field(default_factory=list)
    error: str | None = None
    thread: threading.Thread | None = None
    reuse: bool = False  # keep the base image and the wheels of an earlier build in this directory
    done_file: Path | None = None  # where the outcome is written for test processes that follow the build

    def start(self) -> ImageBuild:
        self.thread = threading.Thread(target=self._build, name="image build", daemon=True)
        self.thread.start()
        return self

    def result(self, timeout: float = 900) -> ImageBuild:
        assert self.thread is not None
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise ImageBuildError(f"the image build took more than {timeout} s")
        if self.error:
            raise ImageBuildError(self.error + "\n" + "\n".join(self.log)[-6000:])
        return self

    def _build(self) -> None:
        started = time.monotonic()
        try:
            wheels = threading.Thread(target=self._step, args=("wheels", self._wheels), daemon=True)
            wheels.start()
            self._step("base", self._base)
            wheels.join()
            if self.error is None:
                self._step("build", self._podman_build)
        except Exception as e:  # reported by result(), in the test that needs the image
            self.error = self.error or f"{type(e).__name__}: {e}"
        self.steps["total"] = time.monotonic() - started
        if self.done_file is not None:
            outcome = {"error": self.error, "steps": self.steps, "log": self.log[-20:], "short": str(self.engine.short)}
            partial = self.done_file.with_suffix(".partial")
            partial.write_text(json.dumps(outcome))
            partial.rename(self.done_file)  # whole or absent for the processes polling it

    def _step(self, name: str, work) -> None:
        started = time.monotonic()
        try:
            work()
        except Exception as e:
            self.error = self.error or f"{name}: {type(e).__name__}: {e}"
        finally:
            self.steps[name] = time.monotonic() - started

    def _run(self, argv: list[str], *, shell: bool = False, cwd: Path | None = None, timeout: float = 600) -> None:
        done = subprocess.run(argv, shell=shell, cwd=cwd, env=self.engine.env, capture_output=True, text=True,
                              timeout=timeout, executable="/bin/bash" if shell else None)
        self.log.append(f"$ {argv}\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
        if done.returncode != 0:
            raise ImageBuildError(f"{argv if shell else ' '.join(argv)} exited with {done.returncode}")

    def _base(self) -> None:
        """Debian trixie as debian:trixie-slim has it, from Debian's archive, as a podman image."""
        if self.reuse and self.engine.podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
            return
        slim = " ".join(f"'{o}'" for o in SLIM)
        self._run(f"{' '.join(NICE)} mmdebstrap {slim} --format=tar {SUITE} - {DEBIAN} | "
                  f"podman import - {BASE_IMAGE}", shell=True)

    def _wheels(self) -> None:
        """The wheels pip installs in the image, fetched by the tests' pip (its index, its certificates)."""
        wheels = self.workdir / "wheels"
        if self.reuse and wheels.is_dir() and any(wheels.glob("mitmproxy-*.whl")):
            return
        self._run([*NICE, sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                   "--wheel-dir", str(wheels), *dependencies()])

    def _podman_build(self) -> None:
        """The README's command, in the repository (.dockerignore picks what the image copies)."""
        self._run(f"{' '.join(NICE)} {self.command}", shell=True, cwd=REPO_ROOT)

    @property
    def wheels(self) -> Path:
        return self.workdir / "wheels"


@dataclass
class FollowedBuild:
    """An ImageBuild made by another process (pytest-xdist's controller, for its workers): the same
    ``command``, ``workdir``, ``steps`` and ``engine`` once ``result()`` has read the outcome it wrote."""

    root: Path  # the build's directory: ``engine`` and ``build`` below it, as the controller made them
    command: str
    done_file: Path
    steps: dict[str, float] = field(default_factory=dict)
    engine: Engine | None = None
    thread: None = None

    @property
    def workdir(self) -> Path:
        return self.root / "build"

    def result(self, timeout: float = 900) -> FollowedBuild:
        deadline = time.monotonic() + timeout
        while not self.done_file.exists():
            if time.monotonic() > deadline:
                raise ImageBuildError(f"the image build took more than {timeout} s")
            time.sleep(0.5)
        outcome = json.loads(self.done_file.read_text())
        if outcome["error"]:
            raise ImageBuildError(outcome["error"] + "\n" + "\n".join(outcome["log"])[-6000:])
        self.steps.update(outcome["steps"])
        if self.engine is None:
            self.engine = Engine(self.root / "engine", short=Path(outcome["short"]))
        return self

"""The systemd unit of README.md and docs/service.md, run as they set it up: its commands as typed, the unit
checked by ``systemd-analyze verify``, and its ``ExecStart`` run as systemd would run it.

No systemd runs on the test machines, so the README's ``systemctl`` commands are the
ones not run (see ``TABLE``). Everything else happens in a private mount namespace
(root: ``unshare --mount``) whose ``/etc`` is a copy of the machine's, ``/opt`` and
``/var/lib`` empty tmpfs, and ``/opt/hub-rewrite`` a scratch checkout of the
repository: the README's paths, its ``useradd``, ``install`` and ``cp`` and the
certbot deploy hook all land there, never on the machine. Then the unit, installed
in that ``/etc`` with the README's drop-in, is verified, the README's check command
runs, and the unit's ``ExecStart`` line runs as written, ``${HUB_MODE}`` from its
``Environment=`` (the drop-in's) and ``${STATE_DIRECTORY}`` as systemd sets it
(``/var/lib/hub-rewrite``, made for the unit's user as ``StateDirectory=`` does), as
the unit's user (the README's static ``hub-rewrite``) without new privileges, with
its ambient capability and its ``LimitNOFILE``. skopeo pulls through it over HTTPS;
the certificate is renewed by the deploy hook under the running mirror; ``SIGTERM``
(``systemctl stop``) ends it cleanly.
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_scripts import OFFLINE_PIP, lib_sh
from tests.support.certs import issue_server_cert, make_ca_and_server_cert, serial_of
from tests.support.checkout import CheckoutError, scratch_checkout
from tests.support.daemons import NO_NETWORK_ENV
from tests.support.mirror import REPO_ROOT
from tests.support.ports import free_port
from tests.support.readme_table import Elsewhere, Handout, Here, documented
from tests.support.systemd_unit import ServiceUnit
from tests.support.typed_shell import Background

UNIT = "/etc/systemd/system/hub-rewrite.service"
STATE = "/var/lib/hub-rewrite"

# ---------------------------------------------------------------- the documents' text, exactly

SETUP = "cd /opt/hub-rewrite && scripts/run --version"
INSTALL_CONF = "install -D -m 0644 mitm.conf /etc/hub-rewrite/mitm.conf"
CP_UNIT = "cp contrib/hub-rewrite.service /etc/systemd/system/"
DAEMON_RELOAD = "systemctl daemon-reload"
ENABLE = "systemctl enable --now hub-rewrite"
USERADD = "useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin hub-rewrite"
DEPLOY_HOOK = "RENEWED_LINEAGE=/etc/letsencrypt/live/mirror.example.com contrib/certbot-deploy-hook"
CERTS_YAML = 'certs: ["*=/etc/hub-rewrite/mirror.pem"]\nhub_public_url: https://mirror.example.com\n'
DROP_IN = ("# /etc/systemd/system/hub-rewrite.service.d/https.conf\n[Service]\n"
           "Environment=HUB_MODE=reverse:https://registry-1.docker.io@443\n")
CHECK = ("/opt/hub-rewrite/.venv/bin/python -m hubrewrite.check --mode reverse:https://registry-1.docker.io@443 "
         "--set hub_config=/etc/hub-rewrite/mitm.conf --set hub_cache_dir=/var/lib/hub-rewrite/cache")
RESTART = "systemctl restart hub-rewrite"

NO_SYSTEMD = ("no systemd runs on the test machines: test_the_unit_as_systemd_runs_it checks what the unit gives "
              "systemd (systemd-analyze verify) and runs its ExecStart as systemd would")
RUNNER = "test_the_unit_as_systemd_runs_it"
TABLE: dict[str, Here | Elsewhere] = {
    SETUP: Here((RUNNER,), environment="in the namespace, /opt/hub-rewrite is a scratch checkout (pip offline)"),
    INSTALL_CONF: Here((RUNNER,)),
    CP_UNIT: Here((RUNNER,)),
    USERADD: Here((RUNNER,)),
    DEPLOY_HOOK: Here((RUNNER,), environment="the namespace's /etc/letsencrypt/live/mirror.example.com holds the "
                                              "test CA's certificate for mirror.example.com and 127.0.0.1"),
    CERTS_YAML: Here((RUNNER,), replaced=("https://mirror.example.com",),
                     environment="its keys set in the installed mitm.conf (the empty hub_public_url line replaced), "
                                 "and ssl_verify_upstream_trusted_ca: the test upstream's CA"),
    DROP_IN: Here((RUNNER,), replaced=("@443", "https://registry-1.docker.io"),
                  environment="the test upstream in place of Docker Hub, a free port in place of 443"),
    CHECK: Here((RUNNER,), replaced=("@443", "https://registry-1.docker.io")),
    DAEMON_RELOAD: Elsewhere(f"tests/integration/test_readme_systemd.py::{RUNNER}", shows="systemd-analyze",
                             note=NO_SYSTEMD),
    ENABLE: Elsewhere(f"tests/integration/test_readme_systemd.py::{RUNNER}", shows="unit.exec_start", note=NO_SYSTEMD),
    RESTART: Elsewhere(f"tests/integration/test_readme_systemd.py::{RUNNER}", shows="signal.SIGTERM",
                       note=NO_SYSTEMD + "; a restart is the SIGTERM it ends with, then a start"),
}


HANDOUT = Handout(TABLE, documented())


def typed(request, key: str, replace: dict[str, str] | None = None, append: str = "") -> str:
    return HANDOUT.text(request.node.originalname, key, replace, append)


# ---------------------------------------------------------------- the namespace


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A scratch checkout that works as /opt/hub-rewrite: its .venv's scripts name /opt/hub-rewrite/.venv,
    and every directory on the way is readable by the unit's user."""
    base = tmp_path_factory.mktemp("systemd")
    try:
        root = scratch_checkout(base / "checkout")
    except CheckoutError as e:
        pytest.skip(str(e))
    shutil.copytree(REPO_ROOT / "contrib", root / "contrib")
    stamped = lib_sh(root, "write_venv_stamp", "")
    assert stamped.returncode == 0, stamped.stderr
    old = f"#!{root}/.venv/bin/".encode()
    for script in (root / ".venv" / "bin").iterdir():
        if script.is_file() and not script.is_symlink() and script.read_bytes().startswith(old):
            script.write_bytes(b"#!/opt/hub-rewrite/.venv/bin/" + script.read_bytes()[len(old):])
    return root


def reachable_python() -> list[str]:
    """Mounts that let another user run this Python: a home directory it lives under (``/root``,
    0700) is shadowed by a tmpfs holding just the interpreter's directory."""
    prefix = Path(sys.base_prefix).resolve()
    closed = next((p for p in reversed(prefix.parents) if p != Path("/") and not os.stat(p).st_mode & 0o001), None)
    if closed is None:
        return []
    q = shlex.quote
    return ["mkdir /opt/.python", f"mount --bind {q(str(prefix))} /opt/.python",
            f"mount -t tmpfs -o mode=0755 tmpfs {q(str(closed))}", f"mkdir -p {q(str(prefix))}",
            f"mount --bind /opt/.python {q(str(prefix))}"]


def namespace_script(checkout: Path, etc: Path, steps: list[str], run: str) -> str:
    """``steps`` then ``run`` (exec'd), where /etc is ``etc``, /opt/hub-rewrite ``checkout``, /var/lib empty."""
    q = shlex.quote
    mounts = [f"mount --bind {q(str(etc))} /etc", "mount -t tmpfs -o mode=0755 tmpfs /opt", "mkdir /opt/hub-rewrite",
              f"mount --bind {q(str(checkout))} /opt/hub-rewrite", "mount -t tmpfs -o mode=0755 tmpfs /var/lib",
              *reachable_python()]
    return "set -e\n" + "\n".join([*mounts, *steps, f"exec {run}"]) + "\n"


def in_namespace(script: str) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", script]


def letsencrypt(etc: Path, tmp: Path) -> Path:
    """A certbot live/ directory for mirror.example.com (and 127.0.0.1) in the namespace's /etc;
    the test CA's files in ``tmp/ca``."""
    certs = make_ca_and_server_cert(tmp / "ca", hosts=("mirror.example.com",), ips=("127.0.0.1",))
    live = etc / "letsencrypt" / "live" / "mirror.example.com"
    live.mkdir(parents=True)
    (live / "fullchain.pem").write_bytes(certs["cert"].read_bytes())
    (live / "privkey.pem").write_bytes(certs["key"].read_bytes())
    return live


def served_serial(port: int, ca: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return serial_of(tls.getpeercert(binary_form=True))


def as_systemd_runs_it(unit: ServiceUnit) -> str:
    """ExecStart= with the unit's environment, user, privileges and open-file limit: what systemd
    applies that can be applied without it (ProtectSystem= and the other sandboxing need systemd; LimitNOFILE=
    at most this machine's hard limit)."""
    argv = unit.exec_start({"STATE_DIRECTORY": STATE})
    env = {**unit.environment(), "STATE_DIRECTORY": STATE, "PATH": "/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8"}
    caps = unit.value("AmbientCapabilities").lower().replace("cap_", "+")
    # systemd raises the limit to the unit's; here the test can only lower it (no CAP_SYS_RESOURCE on these machines)
    limit = min(int(unit.value("LimitNOFILE")), resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    return shlex.join(["env", "-i", *[f"{k}={v}" for k, v in env.items()], "prlimit", f"--nofile={limit}:{limit}",
                       "setpriv", f"--reuid={unit.value('User')}", f"--regid={unit.value('Group')}", "--init-groups",
                       f"--inh-caps=-all,{caps}", f"--ambient-caps=-all,{caps}", f"--bounding-set=-all,{caps}",
                       "--no-new-privs", *argv])


def in_namespace_now(checkout: Path, etc: Path, steps: list[str]) -> str:
    done = subprocess.run(in_namespace(namespace_script(checkout, etc, steps, "true")), cwd=checkout,
                          env={**os.environ, **OFFLINE_PIP}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def set_options(conf: Path, block: str) -> None:
    """Each ``key: value`` of ``block`` in the options file: in place of the key's line, or added."""
    text = conf.read_text()
    for line in block.strip().splitlines():
        key = line.split(":", 1)[0]
        lines = text.splitlines()
        at = next((i for i, old in enumerate(lines) if old.startswith(f"{key}:")), None)
        lines = lines[:at] + [line] + lines[at + 1:] if at is not None else [*lines, line]
        text = "\n".join(lines) + "\n"
    conf.write_text(text)


def readme_setup(request, checkout: Path, etc: Path, port: int, upstream) -> str:
    """The README's steps as typed, the unit verified, the check run: in namespaces of their own."""
    conf_tail = typed(request, CERTS_YAML, {"https://mirror.example.com": f"https://127.0.0.1:{port}"})
    listener = {"@443": f"@{port}", "https://registry-1.docker.io": upstream.api_url}
    drop_in = typed(request, DROP_IN, listener)
    output = in_namespace_now(checkout, etc, [
        typed(request, SETUP), typed(request, INSTALL_CONF), typed(request, CP_UNIT), typed(request, USERADD),
        typed(request, DEPLOY_HOOK),
        f"mkdir -p {UNIT}.d && cat >{UNIT}.d/https.conf <<'INI'\n{drop_in.rstrip()}\nINI",
        f"systemd-analyze verify --man=no {UNIT} && echo verified"])
    set_options(etc / "hub-rewrite" / "mitm.conf", conf_tail)  # the README: "name ... in /etc/hub-rewrite/mitm.conf"
    # the test upstream's certificates come from a CA of the test session (Docker Hub's are publicly trusted)
    shutil.copyfile(upstream.ca_cert, etc / "hub-rewrite" / "upstream-ca.pem")
    set_options(etc / "hub-rewrite" / "mitm.conf", "ssl_verify_upstream_trusted_ca: /etc/hub-rewrite/upstream-ca.pem")
    return output + in_namespace_now(checkout, etc, [typed(request, CHECK, listener)])


def test_the_unit_as_systemd_runs_it(request, checkout, upstream, tmp_path):
    """The README's set-up as typed, the unit verified, its check and its ExecStart as systemd runs them;
    skopeo pulls over HTTPS, the certificate is renewed under it, SIGTERM ends it cleanly."""
    for tool in ("systemd-analyze", "unshare", "setpriv", "prlimit", "useradd", "skopeo"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")
    if os.geteuid() != 0:
        pytest.skip("a private mount namespace needs root")
    port, etc = free_port(), tmp_path / "etc"
    shutil.copytree("/etc", etc, symlinks=True)
    live = letsencrypt(etc, tmp_path)
    output = readme_setup(request, checkout, etc, port, upstream)
    assert "Mitmproxy: 12." in output and "verified" in output, output[-3000:]  # scripts/run --version, the unit
    assert "check: configuration OK" in output and f"would listen at *:{port}" in output, output[-3000:]
    unit = ServiceUnit.load(etc / "systemd/system/hub-rewrite.service",
                            [etc / "systemd/system/hub-rewrite.service.d/https.conf"])
    assert unit.environment()["HUB_MODE"].endswith(f"@{port}") and unit.value("DynamicUser") == "yes"
    state = f"install -d -o {unit.value('User')} -g {unit.value('Group')} -m 0750 {STATE}"  # StateDirectory=
    script = namespace_script(checkout, etc, [state], as_systemd_runs_it(unit))
    with Background(in_namespace(script), checkout, dict(os.environ), tmp_path / "service.log") as service:
        service.wait_ready([port], "listening at", 1, 60)
        pulled_renewed_and_stopped(service, port, live, upstream, tmp_path)


def pulled_renewed_and_stopped(service: Background, port: int, live: Path, upstream, tmp_path: Path) -> None:
    ca = tmp_path / "ca" / "ca.crt"
    copy = subprocess.run(["skopeo", "copy", f"docker://127.0.0.1:{port}/library/alpine:3.19", f"dir:{tmp_path / 'out'}"],
                          env={**os.environ, **NO_NETWORK_ENV, "SSL_CERT_FILE": str(ca)}, capture_output=True,
                          text=True, timeout=120)
    assert copy.returncode == 0, copy.stderr + service.log_tail()
    first = served_serial(port, ca)
    # certbot renews: a new certificate in live/, the deploy hook run by root (outside the namespace: its files)
    renewed = issue_server_cert(tmp_path / "renewed", tmp_path / "ca", hosts=("mirror.example.com",), ips=("127.0.0.1",))
    (live / "fullchain.pem").write_bytes(renewed["cert"].read_bytes())
    (live / "privkey.pem").write_bytes(renewed["key"].read_bytes())
    hook = subprocess.run(["sh", str(REPO_ROOT / "contrib" / "certbot-deploy-hook")],
                          env={**os.environ, "RENEWED_LINEAGE": str(live),
                               "HUB_CERT": str(tmp_path / "etc" / "hub-rewrite" / "mirror.pem")},
                          capture_output=True, text=True, timeout=30)
    assert hook.returncode == 0, hook.stderr
    deadline = time.monotonic() + 5
    while served_serial(port, ca) == first and time.monotonic() < deadline:
        time.sleep(0.3)
    assert served_serial(port, ca) == serial_of(renewed["cert"].read_bytes()), service.log_tail()
    os.killpg(service.pgid, signal.SIGTERM)  # systemctl stop: SIGTERM to the unit's processes
    assert service.proc.wait(30) == 0, service.log_tail()
    log = service.log_text()
    assert "renewed: serial" in log and "Traceback" not in log, log[-3000:]


def test_zz_every_command_assigned_here_ran(request):
    ours = [item for item in request.session.items if item.module is request.module]
    if {item.originalname for item in ours} != {n for n in globals() if n.startswith("test_")}:
        pytest.skip("only part of this module was selected")
    assert HANDOUT.not_run() == []

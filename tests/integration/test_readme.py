"""Every command README.md and the pages of docs/ show, run as a user types it (mitmweb included).

The commands come from the documents themselves (README.md and docs/*.md,
``documents()``): every line of their ``sh`` blocks, the inline ``code`` spans
that are commands (an explicit, reviewed list below), and their configuration
blocks (``daemon.json``, ``hosts.toml``, ``registries.conf``, nginx).  ``TABLE``
at the end maps each of them, by its exact text, to the test here that runs it
(and which placeholders it may replace by real values), or to the test elsewhere
that already runs it; a command missing from the table fails
``test_every_readme_command_is_in_the_table``, so a new command cannot arrive in
a document without a test.

The commands run with ``bash -c`` in a scratch copy of the repository
(tests/support/checkout.py) whose ``.venv`` is a copy of the virtualenv running
the tests, so ``.venv/bin/mitmdump`` and ``scripts/run`` are typed as the README
shows them (pip kept off the network: the copy is already set up).  ``HOME`` is
a directory of this module (mitmproxy's CA is created there, not in the real
home).  Allowed differences, each named in the table: placeholder hosts and
ports replaced by the tests' real ones, placeholder paths (``/var/cache/...``,
``/tmp/...``) by temporary directories, ``...`` secrets by the test's (through
the environment, never on a command line), and the real registries by the test
upstreams (tests/support/upstream.py; there is no internet here).  Once, the
mirror and mitmweb commands run exactly as shown, port 5000 (mitmweb's UI on
8081) and Docker Hub's real URL included (skipped only when a port is taken).
The clients are real: docker against private dockerds (each in a mount
namespace of its own where the README's machine-wide steps land on copies:
/etc/hosts naming ``ghcr.mirror.example``, the CA store that
``update-ca-certificates`` rewrites), containerd's ctr, skopeo, nginx and Ceph RGW.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import ssl
import time
from pathlib import Path

import httpx
import pytest

from hubrewrite.config_file import read_config
from hubrewrite.registry.registries import parse_table
from hubrewrite.settings import OPTIONS
from tests.integration.test_scripts import OFFLINE_PIP, lib_sh
from tests.support.certs import make_ca_and_server_cert
from tests.support.checkout import CheckoutError, scratch_checkout
from tests.support.daemons import NO_NETWORK_ENV, Containerd
from tests.support.images import Pusher, fresh_blob, make_big_layer, push_image, sha256_digest
from tests.support.ports import free_port, port_free
from tests.support.mitmweb_api import MitmwebApi
from tests.support.nginx_front import NginxFront
from tests.support.private_mounts import NamespacedDockerd, can_use_private_mounts, hosts_file
from tests.support.readme_commands import inline_spans
from tests.support.readme_table import BenchSmoke, Elsewhere, Handout, Here, documented, documents
from tests.support.terminal import in_terminal
from tests.support.typed_shell import Background, Shell

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT_TIMEOUT = 120
HOST_MAPPED = "ghcr.mirror.example"  # the README's host name for ghcr.io (hub_host_map)
BUCKET = "mirror-cache"  # the README's bucket
TOKEN_IN_URL = re.compile(r"token=([\w-]+)")
EVERY_ADDRESS = "0.0.0.0"  # where the README's commands listen

# ---------------------------------------------------------------- the documents' commands, exact text

SCRIPTS_RUN = "scripts/run"
SCRIPTS_TEST = "scripts/test"
MITMDUMP = ".venv/bin/mitmdump -s addons/hub_rewrite.py --mode reverse:https://registry-1.docker.io@5000"
MITMWEB = ".venv/bin/mitmweb -s addons/hub_rewrite.py --mode reverse:https://registry-1.docker.io@5000"
DOCKER_PULL = "docker pull localhost:5000/library/nginx:1.27"
DOCKER_PULL_OFFICIAL = "docker pull localhost:5000/nginx:1.27"
DOCKER_LOGIN_HUB = "docker login localhost:5000"
FORWARD_PROXY = ".venv/bin/mitmdump -s addons/hub_rewrite.py --mode regular@8080"
FORWARD_SKOPEO = "HTTPS_PROXY=http://mirror.example.com:8080 skopeo copy docker://ghcr.io/owner/image:1 dir:/tmp/image"
CAT_PEM = "cat fullchain.pem privkey.pem > mirror.pem"
SCRIPTS_RUN_TLS = "scripts/run --certs '*=mirror.pem' --set hub_public_url=https://mirror.example.com:5000"
RECORD = (".venv/bin/mitmdump -s addons/hub_rewrite.py --mode reverse:https://registry-1.docker.io@5000 "
          "--set hub_side_flows=on -w pull.flows")
REPLAY = ".venv/bin/mitmweb -s addons/hub_rewrite.py -n -r pull.flows"
SCRIPTS_RUN_CACHE = "scripts/run --set hub_cache_dir=/var/cache/hub-rewrite --set hub_cache_max_size=50g"
SCRIPTS_RUN_LISTENER = "scripts/run --set hub_cache_dir=/var/cache/hub-rewrite --set hub_blob_listen=0.0.0.0:5001"
SCRIPTS_RUN_BUCKET = ("AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... scripts/run --set hub_cache_dir=/var/cache/hub-rewrite "
                      "--set hub_store_url=s3://mirror-cache/hub --set hub_store_endpoint=https://s3.example.com")
EXPORT_KEYS = "export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=..."
THREE_PROCESSES = (
    "for port in 5001 5002 5003; do\n"
    "    .venv/bin/mitmdump -s addons/hub_rewrite.py --mode reverse:https://registry-1.docker.io@127.0.0.1:$port"
    " --set hub_cache_dir=/var/cache/hub-rewrite-$port --set hub_public_url=https://mirror.example.com"
    " --set hub_store_url=s3://mirror-cache/hub --set hub_store_endpoint=https://s3.example.com &\n"
    "done")
BENCH_PULL = "PYTHONPATH=. .venv/bin/python bench/bench_pull.py --size-mib 1024 --reps 5 --json bench/results/pull.json"
BENCH_CACHE = "PYTHONPATH=. .venv/bin/python bench/bench_cache.py --size-mib 1024 --reps 3 --json bench/results/cache.json"
BENCH_LOAD = "PYTHONPATH=. .venv/bin/python bench/bench_load.py --clients 50 --seconds 120 --json bench/results/load.json"
BENCH_BLOBPATH = ("PYTHONPATH=. .venv/bin/python bench/bench_blobpath.py --size-mib 1024 --reps 3 "
                  "--json bench/results/blobpath.json")
BENCH_SHARED = ("PYTHONPATH=. .venv/bin/python bench/bench_shared.py --size-mib 1024 --reps 3 "
                "--json bench/results/shared.json")
BENCH_RTT = "PYTHONPATH=. .venv/bin/python bench/bench_rtt.py --rtt-ms 50 --reps 3 --json bench/results/rtt.json"
BENCH_BUCKET = ("PYTHONPATH=. .venv/bin/python bench/bench_bucket_client.py --size-mib 512 --reps 3 "
                "--json bench/results/bucket.json")
BENCH_RESUME = ("PYTHONPATH=. .venv/bin/python bench/bench_resume.py --size-mib 1024 --reps 5 "
                "--json bench/results/resume.json")

# inline code spans that are commands
SCRIPTS_RUN_PUBLIC_URL = "scripts/run --set hub_public_url=https://mirror.example.com"
SCRIPTS_TEST_UNIT = "scripts/test tests/unit -x"
SKOPEO_COPY = "skopeo copy --src-tls-verify=false docker://localhost:5000/library/alpine:3.19 dir:/tmp/alpine"
DOCKER_PULL_HOST_MAP = "docker pull ghcr.mirror.example/owner/image"
DOCKER_PULL_PREFIX = "docker pull mirror.example.com/ghcr.io/owner/image"
HTPASSWD = "htpasswd -nB user"
ACCOUNTS = ".venv/bin/python -m hubrewrite.access.accounts USER [--argon2]"
DOCKER_LOGIN_MIRROR = "docker login mirror.example.com"
UPDATE_CA = "update-ca-certificates"
OPTIONS_HELP = ".venv/bin/mitmdump -s addons/hub_rewrite.py --options"
CONFORMANCE_UPSTREAM = ".venv/bin/python -m tests.support.upstream WORKDIR --plain --push-standard --print-passwords"
CONFORMANCE_MIRROR = ".venv/bin/mitmdump -s addons/hub_rewrite.py --mode reverse:EDGE_URL@PORT --set listen_host=127.0.0.1"
INLINE_COMMANDS = (SCRIPTS_RUN_PUBLIC_URL, SCRIPTS_TEST_UNIT, SKOPEO_COPY, DOCKER_PULL_HOST_MAP, DOCKER_PULL_PREFIX,
                   HTPASSWD, ACCOUNTS, DOCKER_LOGIN_MIRROR, UPDATE_CA, OPTIONS_HELP, CONFORMANCE_UPSTREAM,
                   CONFORMANCE_MIRROR)

# Inline spans that look like commands (looks_like_a_command) but are not commands to run, and why.
NOT_COMMANDS = {
    "docker.io/library/nginx:1.27 linux/amd64,linux/arm64": "a line of a hub_prefetch list, not a command "
                                                            "(test_prefetch.py writes such lines)",
    "[registry/]name[:tag or @digest] [platforms]": "the grammar of a hub_prefetch line, in the options table",
    "docker login": "the command's name in prose; `docker login localhost:5000` and `docker login mirror.example.com` run",
    "mitmdump --mode reverse": "names the plain relay of the benchmark table, not a command to type",
    "skopeo copy --all": "names the pull the benchmark tables measure (bench_blobpath.py and bench_cache.py run it)",
    ".ci/run": "CI's entry point, named in prose: it execs scripts/test (see the table)",
    "docker build": "names docker's command for the Containerfile; podman's build command above runs "
                    "(test_readme_container.py)",
    "contrib/certbot-deploy-hook": "names the hook; the README's command that runs it runs",
    "python -m hubrewrite.check": "names the check; the README's check commands run (test_readme_container.py, "
                                  "test_readme_systemd.py)",
    "scripts/run --version": "the systemd block's `cd /opt/hub-rewrite && scripts/run --version` runs it",
    "podman stop": "names the command that sends SIGTERM; the README's `podman stop --time 30 ...` runs",
    "podman run": "names the command; the README's podman run commands run",
    "podman logs": "names where a container's log is; test_readme_container.py reads it",
    "systemctl stop": "names systemd's stop (SIGTERM): no systemd runs on the test machines",
}
PROGRAM = re.compile(r"sudo|docker|dockerd|podman|skopeo|buildah|ctr|nerdctl|crictl|kubectl|mitmdump|mitmweb|mitmproxy|"
                     r"python[\d.]*|pip\d*|curl|wget|htpasswd|openssl|cat|cp|mv|export|systemctl|apt-get|apt|nginx|"
                     r"update-ca-certificates")
ASSIGNMENT = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")
ARGUMENTLESS = {"update-ca-certificates"}  # commands people type without arguments


def looks_like_a_command(span: str) -> bool:
    """A program (or a path) with arguments, an argumentless command, or a script of the repository."""
    first, _, rest = span.partition(" ")
    if "://" in first:
        return False
    if rest:
        return bool(PROGRAM.fullmatch(first.rsplit("/", 1)[-1]) or "/" in first or ASSIGNMENT.fullmatch(first))
    path = REPO_ROOT / first
    return first in ARGUMENTLESS or (path.is_file() and os.access(path, os.X_OK))


# configuration blocks
DAEMON_JSON = '{ "registry-mirrors": ["http://localhost:5000"] }\n'
REGISTRIES_CONF_DOCKER_IO = ('[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n\n[[registry.mirror]]\n'
                             'location = "localhost:5000"\ninsecure = true        # only for a plain-HTTP mirror\n')
HOSTS_TOML_DOCKER_IO = ('server = "https://registry-1.docker.io"\n\n[host."http://localhost:5000"]\n'
                        '  capabilities = ["pull", "resolve"]\n')
HOSTS_TOML_GHCR = ('# /etc/containerd/certs.d/ghcr.io/hosts.toml\nserver = "https://ghcr.io"\n'
                   '[host."https://mirror.example.com"]\n  capabilities = ["pull", "resolve"]\n')
REGISTRIES_CONF_GHCR = ('[[registry]]\nprefix = "ghcr.io"\nlocation = "ghcr.io"\n[[registry.mirror]]\n'
                        'location = "mirror.example.com/ghcr.io"\n')
CREDENTIALS_FORM = "username: <mirror user>\npassword: <mirror password>:<upstream user>:<upstream password>\n"
NGINX_FRONT = (
    "upstream hub_rewrite { server 127.0.0.1:5001; server 127.0.0.1:5002; server 127.0.0.1:5003; }\n"
    "server {\n"
    "    listen 443 ssl; server_name mirror.example.com;\n"
    "    ssl_certificate fullchain.pem; ssl_certificate_key privkey.pem;\n"
    "    client_max_body_size 0; proxy_buffering off; proxy_request_buffering off;\n"
    "    location / { proxy_pass http://hub_rewrite; proxy_http_version 1.1; proxy_set_header Host $host; }\n"
    "}\n")


# ---------------------------------------------------------------- what the documents show


def documented_spans() -> dict[str, list[str]]:
    """Every inline code span of README.md and docs/*.md -> the documents that show it."""
    spans: dict[str, list[str]] = {}
    for document in documents():
        for span in inline_spans(document.read_text()):
            spans.setdefault(span, []).append(document.relative_to(REPO_ROOT).as_posix())
    return spans


def readme_shows() -> dict[str, list[str]]:
    """Every command and configuration block of README.md and docs/*.md -> the documents showing it:
    the commands of their sh blocks, their other blocks whole, and the inline commands of
    INLINE_COMMANDS they still hold."""
    spans = documented_spans()
    return {**documented(), **{command: spans[command] for command in INLINE_COMMANDS if command in spans}}


HANDOUT: Handout  # made at the end of the module, from TABLE


def runner_name(request: pytest.FixtureRequest) -> str:
    return request.fixturename or request.node.originalname


def typed(request: pytest.FixtureRequest, key: str, replace: dict[str, str] | None = None, append: str = "") -> str:
    """The README's text ``key`` for the test or fixture asking, with the replacements the table allows."""
    return HANDOUT.text(runner_name(request), key, replace, append)


def skip(request: pytest.FixtureRequest, reason: str):
    __tracebackhide__ = True
    HANDOUT.skip(runner_name(request), reason)


def need(request: pytest.FixtureRequest, *binaries: str) -> None:
    __tracebackhide__ = True
    for binary in binaries:
        if not shutil.which(binary):
            skip(request, f"{binary} not installed")


# ---------------------------------------------------------------- helpers


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def table_args(upstream, second_upstream) -> str:
    """The test registries in place of the real ones: docker.io and ghcr.io (mitm.conf names the real ones)."""
    return (f"--set hub_upstreams=docker.io={upstream.api_url} "
            f"--set hub_upstreams=ghcr.io={second_upstream.api_url}")


def trust_upstream(upstream) -> str:
    """The option an operator adds for an upstream whose certificates come from their own CA, as the
    test upstream's do (Docker Hub's are publicly trusted: the README's commands need nothing)."""
    return f"--set ssl_verify_upstream_trusted_ca={upstream.ca_cert}"


def mirror_url_env(upstream, port: int) -> dict[str, str]:
    """scripts/run's own knobs (README: "HUB_PORT and HUB_UPSTREAM change the port and the upstream registry")."""
    return {"HUB_PORT": str(port), "HUB_UPSTREAM": upstream.api_url}


def token(base_url: str, repo: str, **kw) -> str:
    r = httpx.get(f"{base_url}/token", params={"service": "registry.docker.io", "scope": f"repository:{repo}:pull"},
                  timeout=30, **kw)
    assert r.status_code == 200, r.text
    return r.json()["token"]


def get_blob(base_url: str, repo: str, digest: str, **kw) -> httpx.Response:
    bearer = token(base_url, repo, verify=kw.get("verify", True))
    return httpx.get(f"{base_url}/v2/{repo}/blobs/{digest}", headers={"Authorization": f"Bearer {bearer}"},
                     timeout=60, **kw)


def trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def edge_paths(up) -> list[str]:
    return [r.get("path", "") for r in up.edge_requests()]


def shared_hits(port: int) -> float:
    """``hub_cache_tier_hits_total{tier="shared"}`` of the mirror process on ``port``."""
    metrics = httpx.get(f"http://127.0.0.1:{port}/_hub/metrics", timeout=10).text
    match = re.search(r'^hub_cache_tier_hits_total\{tier="shared"\} (\S+)$', metrics, re.M)
    return float(match.group(1)) if match else 0.0


def web_api(proc: Background, web_port: int) -> MitmwebApi:
    """mitmweb's REST API, with the token it printed in its URL (never shown in a report)."""
    match = TOKEN_IN_URL.search(proc.log_text())
    assert match, "mitmweb printed no URL with a token"
    return MitmwebApi(f"http://127.0.0.1:{web_port}", match.group(1))


def flow_paths(flows: list[dict]) -> list[str]:
    """Path without the query of every flow: enough to read a failure, no signed URL or token in it."""
    return [f["request"]["path"].split("?", 1)[0] for f in flows]


def is_side_flow(flow: dict) -> bool:
    return flow["comment"].startswith("hub side flow")


def start_mirror(shell: Shell, text: str, log: Path, port: int, *, env: dict[str, str] | None = None,
                 ready_text: str = "listening at", ready_count: int = 1, ports: list[int] | None = None) -> Background:
    return shell.start(text, log, ports=ports or [port], env=env, ready_text=ready_text, ready_count=ready_count)


def no_secret_in(text: str, *values: str) -> bool:
    return not any(v and v in text for v in values)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A scratch copy of the repository, .venv set up (marked as installed with the test extras)."""
    try:
        root = scratch_checkout(tmp_path_factory.mktemp("readme") / "checkout")
    except CheckoutError as e:
        HANDOUT.skip_all(str(e))  # every command runs in the copy
    shutil.copytree(REPO_ROOT / "tests", root / "tests", ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    stamped = lib_sh(root, "write_venv_stamp", "test")
    assert stamped.returncode == 0, stamped.stderr
    return root


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """HOME for every command: mitmproxy's CA in ~/.mitmproxy, created before any mitmdump starts
    (three processes creating it at once would race, which a user's second start never does)."""
    from mitmproxy.certs import CertStore

    path = tmp_path_factory.mktemp("home")
    CertStore.from_store(path / ".mitmproxy", "mitmproxy", 2048)
    return path


@pytest.fixture(scope="module")
def shell(checkout, home) -> Shell:
    # COLUMNS: mitmdump shortens logged URLs to the terminal's width; the tests read whole URLs.
    # No display: mitmweb as typed opens a browser when it finds one.
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    return Shell(checkout, {**env, **OFFLINE_PIP, "HOME": str(home), "COLUMNS": "4000"})


@pytest.fixture(scope="module")
def images(upstream, second_upstream) -> dict[str, dict]:
    """The images the README names that the standard set lacks: library/nginx:1.27 on the
    docker.io upstream, owner/image:1 (also as latest) on the one standing in for ghcr.io."""
    nginx = push_image(upstream, "library/nginx", "1.27", [{"etc/nginx/nginx.conf": "events {}\n"}])
    image = push_image(second_upstream, "owner/image", "1", [{"usr/share/owner/image.txt": "ghcr owner/image\n"}])
    with Pusher(second_upstream) as p:
        p.push_manifest("owner/image", "latest", image["manifest_bytes"], image["media_type"])
    return {"library/nginx": nginx, "owner/image": image}


class Running:
    """A mirror started from a README command, on ``port``."""

    def __init__(self, proc: Background, port: int) -> None:
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"

    def log(self, start: int = 0) -> str:
        return self.proc.log_text()[start:]


@pytest.fixture(scope="module")
def mirror(request, shell, upstream, second_upstream, images, tmp_path_factory) -> Running:
    """The README's mirror command for both test registries, with the README's host map example."""
    port = free_port()
    text = typed(request, MITMDUMP, {"https://registry-1.docker.io": upstream.api_url, "@5000": f"@{port}"},
                 append=f"{table_args(upstream, second_upstream)} --set hub_host_map={HOST_MAPPED}=ghcr.io "
                        f"{trust_upstream(upstream)}")
    with start_mirror(shell, text, tmp_path_factory.mktemp("mirror") / "mirror.log", port) as proc:
        yield Running(proc, port)


@pytest.fixture(scope="module")
def dockerd(request, mirror, tmp_path_factory):
    """A private dockerd configured with the README's daemon.json, resolving ghcr.mirror.example to 127.0.0.1."""
    need_namespaced_dockerd(request)
    config = json.loads(typed(request, DAEMON_JSON, {"localhost:5000": f"localhost:{mirror.port}"}))
    base = tmp_path_factory.mktemp("docker")
    hosts = hosts_file(base / "hosts", [HOST_MAPPED])
    with Containerd(base / "containerd") as ctd:
        with NamespacedDockerd(base / "dockerd", ctd.address, config, binds={"/etc/hosts": hosts},
                               no_proxy=[HOST_MAPPED]) as daemon:
            yield daemon


def need_namespaced_dockerd(request) -> None:
    need(request, "dockerd", "docker", "containerd", "unshare")
    if not can_use_private_mounts():
        skip(request, "dockerd's own /etc files need root (unshare --mount)")


def docker_env(dockerd) -> dict[str, str]:
    return {**NO_NETWORK_ENV, "DOCKER_HOST": dockerd.host, "DOCKER_CONFIG": str(dockerd.cli_config)}


@pytest.fixture(scope="module")
def containerd(request, tmp_path_factory):
    need(request, "containerd", "ctr")
    with Containerd(tmp_path_factory.mktemp("containerd")) as daemon:
        yield daemon


def docker_login(shell: Shell, dockerd, text: str, user: str, password: str):
    """``docker login`` as typed: it asks for the user name and the password on its terminal."""
    return in_terminal(["bash", "-c", text], [("Username: ", user), ("Password: ", password)], secrets=[password],
                       env={**shell.env, **docker_env(dockerd)}, cwd=shell.cwd, timeout=CLIENT_TIMEOUT)


def pulled_digest(result) -> str:
    match = re.search(r"^Digest: (sha256:[0-9a-f]{64})$", result.stdout, re.M)
    assert match, result.stdout + result.stderr
    return match.group(1)


# ---------------------------------------------------------------- the table itself


def test_every_readme_command_is_in_the_table():
    """Every command and block README.md or a page of docs/ shows has a test, and every entry is shown."""
    shown = readme_shows()
    missing = {k: shown[k] for k in sorted(shown) if k not in TABLE}
    assert missing == {}, f"commands or blocks without a test (and where they are shown): {missing}"
    stale = sorted(k for k in TABLE if k not in shown)
    assert stale == [], f"table entries neither README.md nor docs/ shows any longer: {stale}"


def test_every_inline_span_that_looks_like_a_command_is_reviewed():
    """An inline span of README.md or docs/ that looks like a command is in the table or listed as
    not a command, with a reason."""
    spans = documented_spans()
    unreviewed = {s: spans[s] for s in spans if looks_like_a_command(s) and s not in TABLE and s not in NOT_COMMANDS}
    assert unreviewed == {}, f"inline spans that look like commands: add them to INLINE_COMMANDS or NOT_COMMANDS: {unreviewed}"
    assert [c for c in INLINE_COMMANDS if c not in spans] == []
    assert [c for c in NOT_COMMANDS if c not in spans] == []


def test_commands_run_elsewhere_are_run_there():
    problems = {key: entry.problem(key) for key, entry in TABLE.items() if not isinstance(entry, Here)}
    assert {k: p for k, p in problems.items() if p} == {}


def test_runners_named_in_the_table_exist():
    names = set(globals())
    unknown = {key: [r for r in entry.runners if r not in names]
               for key, entry in TABLE.items() if isinstance(entry, Here)}
    assert {k: v for k, v in unknown.items() if v} == {}


# ---------------------------------------------------------------- exactly as typed: port 5000, Docker Hub


def test_mitmdump_as_typed(request, shell, checkout, tmp_path):
    """The README's mirror command, letter for letter: it starts, loads the repository's mitm.conf
    and answers GET /v2/ with registry JSON (502 UNAVAILABLE: Docker Hub is out of reach here)."""
    if not port_free(5000, EVERY_ADDRESS):
        skip(request, "port 5000 is taken: the command as typed cannot listen")
    text = typed(request, MITMDUMP)
    with start_mirror(shell, text, tmp_path / "mitmdump.log", 5000) as proc:
        v2 = httpx.get("http://127.0.0.1:5000/v2/", timeout=60)
        page = httpx.get("http://127.0.0.1:5000/", timeout=30).text
        log = proc.log_text()
    assert_registry_answer(v2)
    assert f"options loaded from {checkout / 'mitm.conf'}" in log, log[-3000:]
    assert "reverse proxy to https://registry-1.docker.io listening at *:5000" in log
    # the table of registries comes from mitm.conf
    for registry in parse_table(read_config(checkout / "mitm.conf")["hub_upstreams"]):
        assert f"<b>{registry}</b>" in page


def assert_registry_answer(response: httpx.Response) -> None:
    """Docker Hub unreachable: 502 UNAVAILABLE; reachable (a machine with internet): its 401 challenge."""
    assert response.status_code in (502, 401), response.text
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"
    code = response.json()["errors"][0]["code"]
    assert code == ("UNAVAILABLE" if response.status_code == 502 else "UNAUTHORIZED"), response.text


def test_mitmweb_as_typed(request, shell, checkout, tmp_path):
    """mitmweb as the README shows it: same mitm.conf (flow_detail skipped), the web UI on its
    default port 8081 with the login token it prints; its REST API lists the GET /v2/."""
    if not port_free(5000, EVERY_ADDRESS) or not port_free(8081, EVERY_ADDRESS):
        skip(request, "port 5000 or 8081 is taken: the command as typed cannot listen")
    text = typed(request, MITMWEB)
    with start_mirror(shell, text, tmp_path / "mitmweb.log", 5000, ports=[5000, 8081],
                      ready_text="Web server listening at") as proc:
        assert_registry_answer(httpx.get("http://127.0.0.1:5000/v2/", timeout=60))
        api = web_api(proc, 8081)
        try:
            flows = wait_for_flows(api, lambda fs: "/v2/" in flow_paths(fs))
        finally:
            api.close()
        log = proc.log_text()
    assert f"options loaded from {checkout / 'mitm.conf'}" in log
    assert f"{checkout / 'mitm.conf'}: flow_detail not used by this mitmproxy tool" in log
    v2 = next(f for f in flows if flow_paths([f]) == ["/v2/"])
    assert v2["response"]["status_code"] in (502, 401)


def wait_for_flows(api: MitmwebApi, done, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        flows = api.flows()
        if done(flows) or time.monotonic() > deadline:
            return flows
        time.sleep(0.2)


# ---------------------------------------------------------------- docker


def test_docker_pull_by_name_and_login(request, shell, mirror, dockerd, upstream, images):
    env = docker_env(dockerd)
    where = {"localhost:5000": f"localhost:{mirror.port}"}
    start = len(mirror.log())
    for key in (DOCKER_PULL, DOCKER_PULL_OFFICIAL):
        result = shell.run(typed(request, key, where), env=env, timeout=CLIENT_TIMEOUT)
        assert result.returncode == 0, result.stderr + mirror.log(start)[-3000:]
        assert pulled_digest(result) == images["library/nginx"]["digest"]
    # both resolved the tag through the mirror, the short name with library/ added
    assert len(re.findall(r" (GET|HEAD) manifest library/nginx:1\.27 status=200", mirror.log(start))) >= 2

    private = f"docker pull localhost:{mirror.port}/private/secret:1.0"
    refused = shell.run(private, env=env, timeout=CLIENT_TIMEOUT)
    assert refused.returncode != 0
    password = upstream.users["alice"]  # "your Docker Hub account"
    login = docker_login(shell, dockerd, typed(request, DOCKER_LOGIN_HUB, where), "alice", password)
    assert login.returncode == 0 and "Login Succeeded" in login.output, login.output
    ok = shell.run(private, env=env, timeout=CLIENT_TIMEOUT)
    assert ok.returncode == 0, ok.stderr
    assert pulled_digest(ok) == upstream.images["private/secret"]["digest"]
    assert password not in mirror.log()


def test_daemon_json_registry_mirror(shell, mirror, dockerd, upstream):
    """dockerd with the README's daemon.json pulls docker.io images through the mirror."""
    start = len(mirror.log())
    result = shell.run("docker pull alpine:3.19", env=docker_env(dockerd), timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, result.stderr + dockerd.log_tail()
    assert pulled_digest(result) == upstream.images["library/alpine"]["digest"]
    assert "/v2/library/alpine/manifests/3.19" in mirror.log(start)


def test_docker_pull_by_host_map(request, shell, mirror, dockerd, second_upstream, images):
    """``docker pull ghcr.mirror.example/owner/image``: a DNS name for the mirror selects ghcr.io."""
    text = typed(request, DOCKER_PULL_HOST_MAP, {HOST_MAPPED: f"{HOST_MAPPED}:{mirror.port}"})
    before = len(second_upstream.edge_requests())
    result = shell.run(text, env=docker_env(dockerd), timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, result.stderr + mirror.log()[-3000:]
    assert pulled_digest(result) == images["owner/image"]["digest"]
    assert "/v2/owner/image/manifests/latest" in edge_paths(second_upstream)[before:]


def test_docker_pull_by_path_prefix(request, shell, mirror, dockerd, second_upstream, images):
    text = typed(request, DOCKER_PULL_PREFIX, {"mirror.example.com": f"127.0.0.1:{mirror.port}"})
    before = len(second_upstream.edge_requests())
    result = shell.run(text, env=docker_env(dockerd), timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, result.stderr + mirror.log()[-3000:]
    assert pulled_digest(result) == images["owner/image"]["digest"]
    assert "/v2/owner/image/manifests/latest" in edge_paths(second_upstream)[before:]


def test_mirror_accounts(request, shell, upstream, second_upstream, dockerd, tmp_path):
    """Users made with the accounts module (bcrypt and argon2) and htpasswd get in with
    ``docker login``, a wrong password does not, and a logged-in docker pulls."""
    need(request, "htpasswd")
    passwords = {user: secrets.token_urlsafe(12) for user in ("ann", "bob", "user")}
    lines = []
    for user, option in (("ann", ""), ("bob", "--argon2")):
        text = typed(request, ACCOUNTS, {"USER": user, "[--argon2]": option})
        made = in_terminal(["bash", "-c", text], [("password: ", passwords[user])], secrets=[passwords[user]],
                           env=shell.env, cwd=shell.cwd)
        assert made.returncode == 0, made.output
        lines.append(made.output.strip().splitlines()[-1])
    made = in_terminal(["bash", "-c", typed(request, HTPASSWD)],
                       [("New password: ", passwords["user"]), ("Re-type new password: ", passwords["user"])],
                       secrets=[passwords["user"]], env=shell.env, cwd=shell.cwd)
    assert made.returncode == 0, made.output
    lines.append(made.output.strip().splitlines()[-1])
    assert [line.split(":", 1)[1][:4] for line in lines] == ["$2b$", "$arg", "$2y$"], lines
    users = tmp_path / "users"
    users.write_text("\n".join(lines) + "\n")

    port = free_port()
    text = typed(request, MITMDUMP, {"https://registry-1.docker.io": upstream.api_url, "@5000": f"@{port}"},
                 append=f"--set hub_users_file={shlex.quote(str(users))} {trust_upstream(upstream)}")
    env = docker_env(dockerd)
    pull = f"docker pull 127.0.0.1:{port}/library/alpine:3.19"
    with start_mirror(shell, text, tmp_path / "accounts.log", port) as proc:
        refused = shell.run(pull, env=env, timeout=CLIENT_TIMEOUT)
        assert refused.returncode != 0
        login_text = typed(request, DOCKER_LOGIN_MIRROR, {"mirror.example.com": f"127.0.0.1:{port}"})
        wrong = docker_login(shell, dockerd, login_text, "ann", "not-" + passwords["ann"])
        assert wrong.returncode != 0, wrong.output
        for user, password in passwords.items():
            login = docker_login(shell, dockerd, login_text, user, password)
            assert login.returncode == 0 and "Login Succeeded" in login.output, (user, login.output)
        ok = shell.run(pull, env=env, timeout=CLIENT_TIMEOUT)
        assert ok.returncode == 0, ok.stderr
        assert pulled_digest(ok) == upstream.images["library/alpine"]["digest"]
        log = proc.log_text()
    assert no_secret_in(log, *passwords.values())


# ---------------------------------------------------------------- podman/skopeo, containerd


def test_registries_conf_for_docker_io(request, shell, mirror, upstream, tmp_path):
    need(request, "skopeo")
    conf = tmp_path / "registries.conf"
    conf.write_text(typed(request, REGISTRIES_CONF_DOCKER_IO, {"localhost:5000": f"localhost:{mirror.port}"}))
    start = len(mirror.log())
    # skopeo 1.9 reads registries.conf from its (hidden) --registries-conf flag, not CONTAINERS_REGISTRIES_CONF
    result = shell.run(f"skopeo --registries-conf {conf} copy docker://docker.io/library/alpine:3.19 dir:{tmp_path / 'out'}",
                       env=NO_NETWORK_ENV, timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, result.stderr + mirror.log(start)[-3000:]
    amd64 = upstream.images["library/alpine"]["manifests"]["amd64"]
    assert sha256_file(tmp_path / "out" / "manifest.json") == amd64["digest"]
    assert "/v2/library/alpine/manifests/3.19" in mirror.log(start)


def test_hosts_toml_for_docker_io(request, mirror, containerd, upstream, tmp_path):
    hosts = tmp_path / "certs.d"
    (hosts / "docker.io").mkdir(parents=True)
    (hosts / "docker.io" / "hosts.toml").write_text(
        typed(request, HOSTS_TOML_DOCKER_IO, {"localhost:5000": f"localhost:{mirror.port}"}))
    start = len(mirror.log())
    result = containerd.ctr("images", "pull", "--hosts-dir", str(hosts), "docker.io/library/alpine:3.19")
    assert result.returncode == 0, result.stderr + mirror.log(start)[-3000:]
    assert "trying next host" not in result.stderr  # the mirror answered everything
    assert upstream.images["library/alpine"]["digest"] in containerd.ctr("images", "ls").stdout
    assert "/v2/library/alpine/manifests/3.19?ns=docker.io" in mirror.log(start)


@pytest.fixture(scope="module")
def forward_proxy(request, shell, second_upstream, images, tmp_path_factory) -> Running:
    """The README's forward-proxy command, ghcr.io served by the test upstream standing in for it."""
    port = free_port()
    text = typed(request, FORWARD_PROXY, {"@8080": f"@{port}"},
                 append=f"--set hub_upstreams=ghcr.io={second_upstream.api_url} {trust_upstream(second_upstream)}")
    with start_mirror(shell, text, tmp_path_factory.mktemp("forward") / "forward.log", port) as proc:
        yield Running(proc, port)


def mitmproxy_ca(home: Path) -> Path:
    """Where the README says mitmproxy creates its CA: ~/.mitmproxy/mitmproxy-ca-cert.pem."""
    return home / ".mitmproxy" / "mitmproxy-ca-cert.pem"


def test_forward_proxy_with_skopeo(request, shell, forward_proxy, home, second_upstream, images, tmp_path):
    """skopeo with HTTPS_PROXY copies ghcr.io/owner/image:1, trusting mitmproxy's CA as its system
    store (Go's SSL_CERT_FILE)."""
    need(request, "skopeo")
    client = typed(request, FORWARD_SKOPEO, {"mirror.example.com:8080": f"127.0.0.1:{forward_proxy.port}",
                                             "/tmp/image": str(tmp_path / "image")})
    before = len(second_upstream.edge_requests())
    result = shell.run(client, env={**NO_NETWORK_ENV, "SSL_CERT_FILE": str(mitmproxy_ca(home))}, timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, result.stderr + forward_proxy.log()[-3000:]
    assert sha256_file(tmp_path / "image" / "manifest.json") == images["owner/image"]["digest"]
    assert "/v2/owner/image/manifests/1" in edge_paths(second_upstream)[before:]


def test_forward_proxy_with_docker(request, shell, forward_proxy, home, second_upstream, images, tmp_path):
    """dockerd set up as the README says for the forward proxy: HTTPS_PROXY in its environment (the
    drop-in's line), mitmproxy's CA copied to /usr/local/share/ca-certificates/mitmproxy.crt and
    ``update-ca-certificates`` run, then dockerd (re)started; ``docker pull ghcr.io/owner/image:1`` works.
    All of it in dockerd's private mount namespace, over copies of the CA store's directories; the
    store's hooks are left out (the Java one reaches dpkg's trigger state, outside any copy)."""
    need_namespaced_dockerd(request)
    certs, local, hooks = tmp_path / "etc-ssl-certs", tmp_path / "local-ca-certificates", tmp_path / "no-hooks"
    shutil.copytree("/etc/ssl/certs", certs, symlinks=True)
    local.mkdir()
    hooks.mkdir()
    before = (f"cp {shlex.quote(str(mitmproxy_ca(home)))} /usr/local/share/ca-certificates/mitmproxy.crt && "
              f"{typed(request, UPDATE_CA)}")
    binds = {"/etc/ssl/certs": certs, "/usr/local/share/ca-certificates": local, "/etc/ca-certificates/update.d": hooks}
    proxy = {"HTTPS_PROXY": f"http://127.0.0.1:{forward_proxy.port}", "https_proxy": f"http://127.0.0.1:{forward_proxy.port}"}
    start = len(second_upstream.edge_requests())
    with Containerd(tmp_path / "containerd") as ctd, \
            NamespacedDockerd(tmp_path / "dockerd", ctd.address, {}, binds=binds, before=before, env=proxy) as daemon:
        result = shell.run("docker pull ghcr.io/owner/image:1", env=docker_env(daemon), timeout=CLIENT_TIMEOUT)
        daemon_log = daemon.log_text()
    assert result.returncode == 0, result.stderr + daemon_log[-3000:] + forward_proxy.log()[-3000:]
    assert pulled_digest(result) == images["owner/image"]["digest"]
    assert "1 added," in daemon_log  # update-ca-certificates took mitmproxy's CA in
    assert "/v2/owner/image/manifests/1" in edge_paths(second_upstream)[start:]
    assert "mitmproxy" not in "".join(p.name for p in Path("/etc/ssl/certs").iterdir())  # the machine's store untouched


# ---------------------------------------------------------------- HTTPS, and the ghcr.io blocks over it


def test_https(request, shell, checkout, upstream, second_upstream, images, containerd, tmp_path):
    """``cat`` the certificate files into mirror.pem, start ``scripts/run --certs``: clients verify the
    mirror's certificate; containerd (ghcr.io hosts.toml) and skopeo (ghcr.io registries.conf) pull through it."""
    need(request, "skopeo")
    certs = make_ca_and_server_cert(tmp_path / "certs", hosts=("mirror.example.com",), ips=("127.0.0.1",))
    shutil.copy(certs["cert"], checkout / "fullchain.pem")  # the user's files from their CA
    shutil.copy(certs["key"], checkout / "privkey.pem")
    cat = shell.run(typed(request, CAT_PEM))
    assert cat.returncode == 0, cat.stderr
    assert (checkout / "mirror.pem").read_bytes() == certs["cert"].read_bytes() + certs["key"].read_bytes()

    port = free_port()
    mirror_host = f"127.0.0.1:{port}"
    text = typed(request, SCRIPTS_RUN_TLS, {"mirror.example.com:5000": mirror_host},
                 append=f"{table_args(upstream, second_upstream)} {trust_upstream(upstream)}")
    trust = {"SSL_CERT_FILE": str(certs["ca"])}  # the test CA as the clients' system store
    with start_mirror(shell, text, tmp_path / "tls.log", port, env=mirror_url_env(upstream, port)) as proc:
        v2 = httpx.get(f"https://{mirror_host}/v2/", verify=trusting(certs["ca"]), timeout=30)
        assert v2.status_code == 401
        assert f'realm="https://{mirror_host}/token"' in v2.headers["www-authenticate"]

        hosts = tmp_path / "certs.d"
        (hosts / "ghcr.io").mkdir(parents=True)  # where the block's first line says it goes
        (hosts / "ghcr.io" / "hosts.toml").write_text(
            typed(request, HOSTS_TOML_GHCR, {"https://mirror.example.com": f"https://{mirror_host}"}))
        ctr = containerd.ctr("images", "pull", "--hosts-dir", str(hosts), "ghcr.io/owner/image:1", env=trust)
        assert ctr.returncode == 0, ctr.stderr + proc.log_text()[-3000:]
        assert "trying next host" not in ctr.stderr
        assert images["owner/image"]["digest"] in containerd.ctr("images", "ls").stdout

        conf = tmp_path / "registries.conf"
        conf.write_text(typed(request, REGISTRIES_CONF_GHCR, {"mirror.example.com": mirror_host}))
        copy = shell.run(f"skopeo --registries-conf {conf} copy docker://ghcr.io/owner/image:1 dir:{tmp_path / 'out'}",
                         env={**NO_NETWORK_ENV, **trust}, timeout=CLIENT_TIMEOUT)
        assert copy.returncode == 0, copy.stderr + proc.log_text()[-3000:]
        assert sha256_file(tmp_path / "out" / "manifest.json") == images["owner/image"]["digest"]
        log = proc.log_text()
    assert "/v2/ghcr.io/owner/image/manifests/1" in log and "/v2/owner/image/manifests/1?ns=ghcr.io" in log


# ---------------------------------------------------------------- scripts/run with options


def test_scripts_run_with_a_public_url(request, shell, upstream, tmp_path):
    port = free_port()
    text = typed(request, SCRIPTS_RUN_PUBLIC_URL, append=trust_upstream(upstream))
    with start_mirror(shell, text, tmp_path / "run.log", port, env=mirror_url_env(upstream, port)):
        v2 = httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=30)
    assert v2.status_code == 401
    assert 'realm="https://mirror.example.com/token"' in v2.headers["www-authenticate"]


def test_scripts_run_with_the_cache(request, shell, upstream, tmp_path):
    port = free_port()
    cache = tmp_path / "cache"
    text = typed(request, SCRIPTS_RUN_CACHE, {"/var/cache/hub-rewrite": str(cache)}, append=trust_upstream(upstream))
    layer = upstream.images["team/ociapp"]["layer_digests"][0]
    with start_mirror(shell, text, tmp_path / "run.log", port, env=mirror_url_env(upstream, port)):
        base = f"http://127.0.0.1:{port}"
        answers = [get_blob(base, "team/ociapp", layer) for _ in range(2)]
        page = httpx.get(base + "/", timeout=30).text
    assert [a.headers["x-hub-cache"] for a in answers] == ["miss", "hit"]
    assert all(sha256_digest(a.content) == layer for a in answers)
    assert (cache / "blobs").is_dir()
    assert " of 50.0g used" in page  # hub_cache_max_size


def test_scripts_run_with_the_blob_listener(request, shell, upstream, tmp_path):
    port, listener = free_port(), free_port()
    text = typed(request, SCRIPTS_RUN_LISTENER, {"/var/cache/hub-rewrite": str(tmp_path / "cache"),
                                                 "0.0.0.0:5001": f"0.0.0.0:{listener}"}, append=trust_upstream(upstream))
    # larger than the blobs the mirror answers itself (64 KiB): sent to the listener
    layer, _ = make_big_layer(tmp_path / "layer.tar", 1 << 20, seed=b"readme-listener")
    push_image(upstream, "team/readme-listener", "1", [tmp_path / "layer.tar"], media="oci")
    with start_mirror(shell, text, tmp_path / "run.log", port, ports=[port, listener],
                      env=mirror_url_env(upstream, port)):
        redirect = get_blob(f"http://127.0.0.1:{port}", "team/readme-listener", layer)
        assert redirect.status_code == 307, redirect.text
        location = redirect.headers["location"]
        assert location.startswith(f"http://127.0.0.1:{listener}/")
        blob = httpx.get(location, timeout=30)
    assert blob.status_code == 200 and sha256_digest(blob.content) == layer


# ---------------------------------------------------------------- the shared bucket


@pytest.fixture(scope="module")
def bucket(ceph) -> str:
    return ceph.make_bucket(BUCKET)


def s3_env(ceph) -> dict[str, str]:
    """The test's keys, handed to the command's ``...`` through variables of their own (never on a command line)."""
    return {"README_S3_KEY": ceph.access_key, "README_S3_SECRET": ceph.secret_key}


S3_KEYS = {"AWS_ACCESS_KEY_ID=...": 'AWS_ACCESS_KEY_ID="$README_S3_KEY"',
           "AWS_SECRET_ACCESS_KEY=...": 'AWS_SECRET_ACCESS_KEY="$README_S3_SECRET"'}


def test_scripts_run_with_a_shared_bucket(request, shell, upstream, ceph, bucket, tmp_path):
    port = free_port()
    text = typed(request, SCRIPTS_RUN_BUCKET, {**S3_KEYS, "/var/cache/hub-rewrite": str(tmp_path / "cache"),
                                               "https://s3.example.com": ceph.endpoint_url}, append=trust_upstream(upstream))
    digest, _ = fresh_blob(upstream, tmp_path, "team/readme-bucket", 512 * 1024)
    with start_mirror(shell, text, tmp_path / "run.log", port, env={**mirror_url_env(upstream, port), **s3_env(ceph)}) as proc:
        blob = get_blob(f"http://127.0.0.1:{port}", "team/readme-bucket", digest)
        assert blob.status_code == 200 and sha256_digest(blob.content) == digest
        assert ceph.wait_for_blob(BUCKET, "hub", digest), "the blob never reached the bucket"
        health = httpx.get(f"http://127.0.0.1:{port}/_hub/health", timeout=30).json()
        log = proc.log_text()
    assert health["status"] == "ok", health
    assert no_secret_in(log, ceph.access_key, ceph.secret_key)


def test_three_processes_behind_nginx(request, shell, upstream, ceph, bucket, tmp_path):
    """The README's three-process deployment: nginx (the README's server block, TLS) in front of three
    mirrors on one bucket.  skopeo pulls through nginx; a blob one process fetched is served by another
    from the bucket (one CDN request in all)."""
    need(request, "skopeo")
    ports = [free_port() for _ in range(3)]
    front = free_port()
    public = f"127.0.0.1:{front}"
    replace = {"5001": str(ports[0]), "5002": str(ports[1]), "5003": str(ports[2])}
    script = "\n".join([
        typed(request, EXPORT_KEYS, S3_KEYS),
        typed(request, THREE_PROCESSES, {**replace, "https://registry-1.docker.io": upstream.api_url,
                                         "--set hub_store_url=": f"{trust_upstream(upstream)} --set hub_store_url=",
                                         "/var/cache/hub-rewrite": str(tmp_path / "cache"),
                                         "https://mirror.example.com": f"https://{public}",
                                         "https://s3.example.com": ceph.endpoint_url}),
    ])
    site = typed(request, NGINX_FRONT, {**replace, "443": str(front)})
    certs = make_ca_and_server_cert(tmp_path / "certs", hosts=("mirror.example.com",), ips=("127.0.0.1",))
    files = {"fullchain.pem": certs["cert"].read_bytes(), "privkey.pem": certs["key"].read_bytes()}
    digest, _ = fresh_blob(upstream, tmp_path, "team/readme-three", 512 * 1024)
    with start_mirror(shell, script, tmp_path / "three.log", ports[0], ports=ports, ready_count=3,
                      env=s3_env(ceph)) as proc, \
            NginxFront(tmp_path / "nginx", site, port=front, files=files):
        copy = shell.run(f"skopeo copy docker://{public}/library/alpine:3.19 dir:{tmp_path / 'out'}",
                         env={**NO_NETWORK_ENV, "SSL_CERT_FILE": str(certs["ca"])}, timeout=CLIENT_TIMEOUT)
        assert copy.returncode == 0, copy.stderr + proc.log_text()[-3000:]
        amd64 = upstream.images["library/alpine"]["manifests"]["amd64"]
        assert sha256_file(tmp_path / "out" / "manifest.json") == amd64["digest"]

        base = f"https://{public}"
        first = get_blob(base, "team/readme-three", digest, verify=trusting(certs["ca"]))
        assert first.status_code == 200 and sha256_digest(first.content) == digest
        assert ceph.wait_for_blob(BUCKET, "hub", digest)
        hits_before = sum(shared_hits(p) for p in ports)
        for _ in range(3):  # nginx sends the requests round the three processes
            again = get_blob(base, "team/readme-three", digest, verify=trusting(certs["ca"]))
            assert again.status_code == 200 and sha256_digest(again.content) == digest
        hits_after = sum(shared_hits(p) for p in ports)
        log = proc.log_text()
    assert upstream.cdn_gets(digest) == 1
    assert hits_after > hits_before, "no process served the blob from the bucket"
    assert no_secret_in(log, ceph.access_key, ceph.secret_key)


# ---------------------------------------------------------------- mitmweb with a pull, record and replay


def test_mitmweb_shows_a_skopeo_pull(request, shell, checkout, upstream, tmp_path):
    """mitmweb as the README shows it (the test upstream, its own ports) while the README's skopeo
    command pulls through it: the REST API lists the client flows and the mirror's side flows."""
    need(request, "skopeo")
    port, web_port = free_port(), free_port()
    text = typed(request, MITMWEB, {"https://registry-1.docker.io": upstream.api_url, "@5000": f"@{port}"},
                 append=f"--set web_port={web_port} {trust_upstream(upstream)}")
    copy = typed(request, SKOPEO_COPY, {"localhost:5000": f"localhost:{port}", "/tmp/alpine": str(tmp_path / "alpine")})
    with start_mirror(shell, text, tmp_path / "mitmweb.log", port, ports=[port, web_port],
                      ready_text="Web server listening at") as proc:
        result = shell.run(copy, env=NO_NETWORK_ENV, timeout=CLIENT_TIMEOUT)
        assert result.returncode == 0, result.stderr
        api = web_api(proc, web_port)
        try:
            flows = api.flows()
        finally:
            api.close()
        log = proc.log_text()
    alpine = upstream.images["library/alpine"]
    amd64 = alpine["manifests"]["amd64"]
    assert sha256_file(tmp_path / "alpine" / "manifest.json") == amd64["digest"]
    client = flow_paths([f for f in flows if not is_side_flow(f)])
    assert "/v2/library/alpine/manifests/3.19" in client, client
    assert {f"/v2/library/alpine/blobs/{d}" for d in amd64["layer_digests"]} <= set(client), client
    assert any(is_side_flow(f) for f in flows), flow_paths(flows)
    assert f"options loaded from {checkout / 'mitm.conf'}" in log


def test_record_and_replay(request, shell, checkout, upstream, tmp_path):
    """Recorded with mitmdump -w (side flows on), opened with mitmweb -n -r: the client flows, the side
    flows and the decoded manifest view are there."""
    need(request, "skopeo")
    port, web_port = free_port(), free_port()
    record = typed(request, RECORD, {"https://registry-1.docker.io": upstream.api_url, "@5000": f"@{port}"},
                   append=trust_upstream(upstream))
    with start_mirror(shell, record, tmp_path / "record.log", port):
        result = shell.run(f"skopeo copy --src-tls-verify=false docker://127.0.0.1:{port}/team/ociapp:1.0 "
                           f"dir:{tmp_path / 'out'}", env=NO_NETWORK_ENV, timeout=CLIENT_TIMEOUT)
        assert result.returncode == 0, result.stderr
    assert (checkout / "pull.flows").stat().st_size > 0

    replay = typed(request, REPLAY, append=f"--set web_port={web_port}")
    with start_mirror(shell, replay, tmp_path / "replay.log", web_port, ready_text="Web server listening at") as proc:
        api = web_api(proc, web_port)
        try:
            flows = wait_for_flows(api, lambda fs: "/v2/team/ociapp/manifests/1.0" in flow_paths(fs))
            manifest = next(f for f in flows if flow_paths([f]) == ["/v2/team/ociapp/manifests/1.0"]
                            and f["response"]["status_code"] == 200)
            view = api.content(manifest["id"], "response")["view_name"]
        finally:
            api.close()
    assert any(is_side_flow(f) for f in flows), flow_paths(flows)
    assert view == "Registry manifest"


# ---------------------------------------------------------------- the options' help, docs/conformance.md's set-up


def help_comments(dump: str) -> dict[str, str]:
    """``mitmdump --options``'s YAML: each key -> the comment lines above it, without white space
    (the lines are wrapped, at hyphens too)."""
    helps, comment = {}, []
    for line in dump.splitlines():
        if line.startswith("#"):
            comment.append(line.lstrip("#"))
        elif match := re.match(r"(\w+):", line):
            helps[match[1]], comment = "".join("".join(comment).split()), []
    return helps


def test_options_help(request, shell):
    """The README's way to every option's full help: mitmdump with the addon prints each hub_* option
    with the help settings.py declares."""
    result = shell.run(typed(request, OPTIONS_HELP), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    helps = help_comments(result.stdout)
    missing = [o.name for o in OPTIONS if not helps.get(o.name, "").startswith("".join(o.help.split()))]
    assert missing == [], result.stdout[-3000:]


def printed_json(log: str) -> dict:
    """The description the upstream prints once it is ready (a JSON object, indented)."""
    return json.JSONDecoder().raw_decode(log[log.index('{\n  "api_url"'):])[0]


def conformance_pull(base: str, upstream: dict) -> httpx.Response:
    """What the suite does first with OCI_USERNAME/OCI_PASSWORD: /v2/, a token from the realm its
    challenge names, the manifest of team/ociapp:1.0."""
    v2 = httpx.get(f"{base}/v2/", timeout=30)
    assert v2.status_code == 401, v2.text
    realm = re.search(r'realm="([^"]+)"', v2.headers["www-authenticate"])[1]
    scope = {"service": upstream["service"], "scope": "repository:team/ociapp:pull"}
    got = httpx.get(realm, params=scope, auth=("alice", upstream["users"]["alice"]), timeout=30)
    assert got.status_code == 200, got.text
    return httpx.get(f"{base}/v2/team/ociapp/manifests/1.0", timeout=30,
                     headers={"Authorization": f"Bearer {got.json()['token']}",
                              "Accept": "application/vnd.oci.image.manifest.v1+json"})


def test_conformance_setup(request, shell, tmp_path):
    """docs/conformance.md's set-up as typed: the test upstream started by hand (plain HTTP, the
    standard images), then the two mirrors in front of its edge, the second with the cache; each
    gives the suite's user the manifest it tests, by the digest it names."""
    started = typed(request, CONFORMANCE_UPSTREAM, {"WORKDIR": str(tmp_path / "upstream")},
                    append="--big-size 1048576")
    with shell.start(started, tmp_path / "upstream.log", ports=[], ready_text='"users"', timeout=300) as proc:
        upstream = printed_json(proc.log_text())
        assert upstream["api_url"].startswith("http://")
        for name, cache in (("plain", ""), ("cache", f"--set hub_cache_dir={tmp_path / 'cache'}")):
            port = free_port()
            text = typed(request, CONFORMANCE_MIRROR, {"EDGE_URL": upstream["api_url"], "PORT": str(port)},
                         append=cache)
            with start_mirror(shell, text, tmp_path / f"{name}.log", port):
                for _ in range(2 if cache else 1):  # with the cache: cold, then warm
                    manifest = conformance_pull(f"http://127.0.0.1:{port}", upstream)
                    assert manifest.status_code == 200, manifest.text
                    assert sha256_digest(manifest.content) == manifest.headers["docker-content-digest"]
            if cache:
                assert manifest.headers["x-hub-cache"] == "hit"


# ---------------------------------------------------------------- scripts/test


def test_scripts_test_with_arguments(request, shell):
    """``scripts/test tests/unit -x`` in the scratch copy: the set-up steps pass without installing anything
    and the arguments reach pytest, which collects the unit tests (running them is CI's job: collect only)."""
    result = shell.run(typed(request, SCRIPTS_TEST_UNIT), env={"PYTEST_ADDOPTS": "--collect-only -q"}, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "setup:" not in result.stderr
    collected = re.findall(r"^(\S+)::", result.stdout, re.M)  # pytest -q --collect-only: one node id a line
    assert len(collected) > 100 and all(path.startswith("tests/unit/") for path in collected)


# ---------------------------------------------------------------- last: every command the table gives this module ran


def test_zz_every_command_assigned_here_ran(request):
    ours = [item for item in request.session.items if item.module is request.module]
    defined = [name for name in globals() if name.startswith("test_")]
    if {item.originalname for item in ours} != set(defined):
        pytest.skip("only part of this module was selected")
    assert HANDOUT.not_run() == []


# ---------------------------------------------------------------- the table

TEST_UPSTREAMS = "the test upstreams in place of the real registries (mitm.conf names the real ones)"
TRUST = ("--set ssl_verify_upstream_trusted_ca=<the test upstream's CA> (the test upstream is HTTPS with "
         "certificates of a CA the test session makes; Docker Hub's are publicly trusted)")
MIRROR_KNOBS = "HUB_PORT and HUB_UPSTREAM (scripts/run's documented knobs): a free port, the test upstream"

TABLE: dict[str, Here | Elsewhere | BenchSmoke] = {
    # ---- sh blocks
    SCRIPTS_RUN: Elsewhere("tests/integration/test_scripts.py::test_restart_starts_at_once_without_the_package_index",
                           shows='["scripts/run", "--set"',
                           note="with HUB_PORT/HUB_UPSTREAM, pip offline, the test upstream's CA trusted "
                                "(--set ssl_verify_upstream_trusted_ca)"),
    SCRIPTS_TEST: Elsewhere(".ci/run", shows="exec scripts/test",
                            note="CI runs it: every test, this module included (running it here would recurse)"),
    MITMDUMP: Here(("test_mitmdump_as_typed", "mirror", "test_mirror_accounts"),
                   replaced=("https://registry-1.docker.io", "@5000"),
                   appended=f"--set hub_upstreams=... ({TEST_UPSTREAMS}); the README's --set hub_host_map "
                            "example; --set hub_users_file=<a file of users made by the README's commands>; "
                            + TRUST),
    DOCKER_PULL: Here(("test_docker_pull_by_name_and_login",), replaced=("localhost:5000",),
                      environment="DOCKER_HOST/DOCKER_CONFIG: the private dockerd"),
    DOCKER_PULL_OFFICIAL: Here(("test_docker_pull_by_name_and_login",), replaced=("localhost:5000",),
                               environment="DOCKER_HOST/DOCKER_CONFIG: the private dockerd"),
    DOCKER_LOGIN_HUB: Here(("test_docker_pull_by_name_and_login",), replaced=("localhost:5000",),
                           environment="a terminal, typing alice's upstream user name and password"),
    FORWARD_PROXY: Here(("forward_proxy",), replaced=("@8080",),
                        appended=f"--set hub_upstreams=ghcr.io=... ({TEST_UPSTREAMS}); {TRUST}"),
    FORWARD_SKOPEO: Here(("test_forward_proxy_with_skopeo",), replaced=("mirror.example.com:8080", "/tmp/image"),
                         environment="SSL_CERT_FILE: mitmproxy's CA from ~/.mitmproxy as the system store"),
    CAT_PEM: Here(("test_https",)),
    SCRIPTS_RUN_TLS: Here(("test_https",), replaced=("mirror.example.com:5000",),
                          appended=f"--set hub_upstreams=... ({TEST_UPSTREAMS}); {TRUST}", environment=MIRROR_KNOBS),
    MITMWEB: Here(("test_mitmweb_as_typed", "test_mitmweb_shows_a_skopeo_pull"),
                  replaced=("https://registry-1.docker.io", "@5000"),
                  appended=f"--set web_port=<free port> (8081 may be taken) and {TRUST}, when not run as typed"),
    RECORD: Here(("test_record_and_replay",), replaced=("https://registry-1.docker.io", "@5000"), appended=TRUST),
    REPLAY: Here(("test_record_and_replay",), appended="--set web_port=<free port> (8081 may be taken)"),
    SCRIPTS_RUN_CACHE: Here(("test_scripts_run_with_the_cache",), replaced=("/var/cache/hub-rewrite",),
                            appended=TRUST, environment=MIRROR_KNOBS),
    SCRIPTS_RUN_LISTENER: Here(("test_scripts_run_with_the_blob_listener",),
                               replaced=("/var/cache/hub-rewrite", "0.0.0.0:5001"), appended=TRUST,
                               environment=MIRROR_KNOBS),
    SCRIPTS_RUN_BUCKET: Here(("test_scripts_run_with_a_shared_bucket",),
                             replaced=("AWS_ACCESS_KEY_ID=...", "AWS_SECRET_ACCESS_KEY=...", "/var/cache/hub-rewrite",
                                       "https://s3.example.com"), appended=TRUST,
                             environment=f"{MIRROR_KNOBS}; the keys of Ceph RGW's test user"),
    EXPORT_KEYS: Here(("test_three_processes_behind_nginx",),
                      replaced=("AWS_ACCESS_KEY_ID=...", "AWS_SECRET_ACCESS_KEY=..."),
                      environment="the keys of Ceph RGW's test user"),
    THREE_PROCESSES: Here(("test_three_processes_behind_nginx",),
                          replaced=("5001", "5002", "5003", "https://registry-1.docker.io", "/var/cache/hub-rewrite",
                                    "https://mirror.example.com", "https://s3.example.com", "--set hub_store_url="),
                          environment=f"{TRUST}, put before --set hub_store_url"),
    BENCH_PULL: BenchSmoke(),
    BENCH_CACHE: BenchSmoke(),
    BENCH_LOAD: BenchSmoke(),
    BENCH_BLOBPATH: BenchSmoke(),
    BENCH_SHARED: BenchSmoke(),
    BENCH_RTT: BenchSmoke(),
    BENCH_BUCKET: BenchSmoke(),
    BENCH_RESUME: BenchSmoke(),
    # ---- inline commands
    SCRIPTS_RUN_PUBLIC_URL: Here(("test_scripts_run_with_a_public_url",), appended=TRUST, environment=MIRROR_KNOBS),
    SCRIPTS_TEST_UNIT: Here(("test_scripts_test_with_arguments",),
                            environment="PYTEST_ADDOPTS=--collect-only (the unit tests run in CI's scripts/test)"),
    SKOPEO_COPY: Here(("test_mitmweb_shows_a_skopeo_pull",), replaced=("localhost:5000", "/tmp/alpine")),
    DOCKER_PULL_HOST_MAP: Here(("test_docker_pull_by_host_map",), replaced=(HOST_MAPPED,),
                               environment="dockerd resolves ghcr.mirror.example to 127.0.0.1 (its own /etc/hosts); "
                                           "the mirror's port added"),
    DOCKER_PULL_PREFIX: Here(("test_docker_pull_by_path_prefix",), replaced=("mirror.example.com",)),
    HTPASSWD: Here(("test_mirror_accounts",), environment="a terminal, typing the password twice"),
    ACCOUNTS: Here(("test_mirror_accounts",), replaced=("USER", "[--argon2]"),
                   environment="a terminal, typing the password"),
    DOCKER_LOGIN_MIRROR: Here(("test_mirror_accounts",), replaced=("mirror.example.com",),
                              environment="a terminal, typing a mirror user's name and password"),
    OPTIONS_HELP: Here(("test_options_help",)),
    CONFORMANCE_UPSTREAM: Here(("test_conformance_setup",), replaced=("WORKDIR",),
                               appended="--big-size 1048576: the standard set's big layer small (no test here "
                                        "pulls it)"),
    CONFORMANCE_MIRROR: Here(("test_conformance_setup",), replaced=("EDGE_URL", "PORT"),
                             appended="--set hub_cache_dir=<a temporary directory>, for the second mirror (as "
                                      "docs/conformance.md says)"),
    UPDATE_CA: Here(("test_forward_proxy_with_docker",),
                    environment="in dockerd's private mount namespace, over copies of /etc/ssl/certs and "
                                "/usr/local/share/ca-certificates (holding mitmproxy.crt), hooks left out"),
    # ---- configuration blocks
    DAEMON_JSON: Here(("dockerd",), replaced=("localhost:5000",),
                      environment="the private dockerd's daemon.json (plus its own storage keys)"),
    REGISTRIES_CONF_DOCKER_IO: Here(("test_registries_conf_for_docker_io",), replaced=("localhost:5000",),
                                    environment="skopeo --registries-conf <the file>"),
    HOSTS_TOML_DOCKER_IO: Here(("test_hosts_toml_for_docker_io",), replaced=("localhost:5000",),
                               environment="ctr --hosts-dir <dir>/docker.io/hosts.toml"),
    HOSTS_TOML_GHCR: Here(("test_https",), replaced=("https://mirror.example.com",),
                          environment="ctr --hosts-dir <dir>/ghcr.io/hosts.toml; the test CA via SSL_CERT_FILE"),
    REGISTRIES_CONF_GHCR: Here(("test_https",), replaced=("mirror.example.com",),
                               environment="skopeo --registries-conf <the file>; the test CA via SSL_CERT_FILE"),
    CREDENTIALS_FORM: Elsewhere("tests/integration/test_routing.py::test_accounts_private_image_with_upstream_credentials",
                                shows='f"bob:{bob}:alice:{alice}"',
                                note="a form of credentials, not a command: <mirror password>:<upstream user>:<upstream password>"),
    NGINX_FRONT: Here(("test_three_processes_behind_nginx",), replaced=("443", "5001", "5002", "5003"),
                      environment="included in a main nginx.conf that keeps pid, logs and temp files in a work dir"),
}

# the README's "Running it as a service" commands run in modules of their own, each with its own
# table and a last test that checks every command it was given ran
from tests.integration import test_readme_container as _container  # noqa: E402 (not test_* names here:
from tests.integration import test_readme_systemd as _systemd  # noqa: E402  test_zz counts those)

for _module in (_systemd, _container):
    for _key in _module.TABLE:
        TABLE.setdefault(_key, Elsewhere(f"tests/integration/{_module.__name__.rsplit('.', 1)[1]}.py",
                                         shows="HANDOUT.not_run() == []", note="its own table says how"))

HANDOUT = Handout(TABLE, readme_shows())

"""Check a configuration before a restart: ``python -m hubrewrite.check [mitmdump arguments]``.

It runs mitmdump as the service would, with the same arguments (the addon is
added when they do not name it) plus ``--set server=false`` (mitmproxy opens
no listener: the running mirror keeps its ports) and ``--set hub_check=true``:
every option is validated as at a real start, ``mitm.conf`` included, and so
are the certificate files and the cache directory's layout; then it prints
what the mirror would serve and exits 0, or prints the problem and exits 1.
Nothing is bound and nothing is written: no cache, no secret, and mitmproxy's
CA is made in a temporary directory (the check does not read the real one).

Run it as the user the mirror runs as: whether the cache directory can be
written is checked with that user's rights.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from mitmproxy import exceptions
from mitmproxy.proxy import mode_specs
from mitmproxy.utils import human

from .cache import layout
from .certificates import Watched
from .connlimits import FileBudget
from .mitmseams.tools import run_mitmdump
from .settings import CacheSettings, Settings

ADDON = Path(__file__).resolve().parent.parent / "addons" / "hub_rewrite.py"


def report(settings: Settings, listeners: list[str], certificates: list[Watched]) -> list[str]:
    """What the mirror would serve, one line each; raises OptionsError for what would stop it.

    ``listeners``: mitmproxy's listeners, as ``listener_line`` describes them."""
    lines = list(listeners)
    lines += [_certificate(w) for w in certificates]
    table = settings.registries
    lines.append("registries: " + ", ".join(
        f"{name} ({', '.join(upstream.bases)}{', default' if name == table.default else ''})"
        for name, upstream in table.table.items()))
    lines.append(f"public URL: {settings.public_url or 'from each client connection'}")
    accounts = settings.accounts
    lines.append(f"access: {f'{len(accounts.users)} mirror account(s)' if accounts else 'open (no mirror accounts)'}"
                 f", {len(settings.rules.allow)} allow / {len(settings.rules.deny)} deny pattern(s)")
    lines += _cache(settings.cache)
    lines.append(_open_files(settings))
    lines.append(f"log format: {settings.log_format}")
    return lines


def listener_line(spec: str, listen_host: str, listen_port: int | None, tls: bool) -> str:
    """One of mitmproxy's listeners (``--mode``, with ``listen_host``/``listen_port``), in words."""
    mode = mode_specs.ProxyMode.parse(spec)
    where = f"{mode.listen_host(listen_host) or '*'}:{mode.listen_port(listen_port)}"
    scheme = "HTTP and HTTPS" if tls else "HTTP"
    if isinstance(mode, mode_specs.ReverseMode):
        return f"would listen at {where} ({scheme}): reverse proxy to {mode.data}"
    return f"would listen at {where}: forward proxy"


def _certificate(watched: Watched) -> str:
    # mitmproxy has loaded and checked the file by now (its tlsconfig addon): only describe it
    cert = x509.load_pem_x509_certificates(watched.path.read_bytes())[0]
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = ", ".join(str(n.value) for n in names)
    except x509.ExtensionNotFound:
        names = cert.subject.rfc4514_string()
    return (f"certificate for {watched.spec}: {watched.path} ({names}; valid until "
            f"{cert.not_valid_after_utc:%Y-%m-%d}; a renewed file is taken without a restart)")


def _cache(cache: CacheSettings | None) -> list[str]:
    if cache is None:
        return ["cache: none (hub_cache_dir is empty)"]
    try:
        found = layout.inspect(cache.directory)
    except layout.LayoutError as e:
        raise exceptions.OptionsError(f"hub_cache_dir: {e}") from e
    problem = _not_writable(cache.directory)
    if problem:
        raise exceptions.OptionsError(f"hub_cache_dir {cache.directory}: {problem}")
    limit = f"limit {human.pretty_size(cache.max_bytes)}" if cache.max_bytes else "no size limit"
    lines = [f"cache: {cache.directory} ({found.plan()}; {limit})"]
    if cache.blob_listen:
        lines.append(f"blob listener: would listen at {cache.blob_listen[0]}:{cache.blob_listen[1]}")
    if cache.store:
        lines.append(f"shared bucket: {cache.store} (not contacted by the check)")
    return lines


def _not_writable(directory: Path) -> str | None:
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} cannot be written by this user (uid {os.getuid()})"
    return None


def _open_files(settings: Settings) -> str:
    """What the open-file limit allows, counted as the mirror counts it (connlimits.py)."""
    budget = FileBudget(lambda: settings)  # raises this process's soft limit to the hard one, as the mirror does
    allowed, wanted = budget.connections(), settings.limits.max_connections
    if allowed >= wanted:
        return f"open files: limit {budget.file_limit}, enough for hub_max_connections ({wanted}) per port"
    return (f"open files: limit {budget.file_limit} allows {allowed} client connections per port, not "
            f"hub_max_connections ({wanted}): raise the hard limit (LimitNOFILE, --ulimit nofile)")


def arguments(argv: list[str], confdir: str) -> list[str]:
    """mitmdump's arguments for the check: the service's own, the addon if missing, no listener."""
    named = any(a in ("-s", "--scripts") or a.startswith("--scripts=") for a in argv)
    return ([] if named else ["-s", str(ADDON)]) + argv + [
        "--set", "server=false", "--set", "hub_check=true", "--set", f"confdir={confdir}"]


def main(argv: list[str] | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="hub-rewrite-check-") as confdir:
        run_mitmdump(arguments(list(sys.argv[1:] if argv is None else argv), confdir))
    return 0  # mitmdump exits 1 itself when an option (or the addon) failed


if __name__ == "__main__":
    sys.exit(main())

"""``mitm.conf``: a YAML file of mitmproxy options, loaded by the addon.

Precedence is defaults < mitm.conf < command line: a key from the file is only
applied while the option still has its default value, so ``--set`` wins.
"""

from __future__ import annotations

from pathlib import Path

from mitmproxy import exceptions, optmanager

# mitmproxy opens its listeners before it loads scripts, so these cannot take
# effect from a file the addon reads; refuse them instead of silently ignoring.
LISTENER_OPTIONS = frozenset({"mode", "listen_host", "listen_port", "server"})


def read_config(path: Path) -> dict[str, object]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise exceptions.OptionsError(f"cannot read {path}: {e.strerror}") from e
    try:
        data = optmanager.parse(text)
    except exceptions.OptionsError as e:
        raise exceptions.OptionsError(f"{path}: {e}") from e
    return data or {}


def options_to_apply(options: optmanager.OptManager, data: dict[str, object], source: str) -> dict[str, object]:
    """Validate the file's keys; return those not already set on the command line."""
    unknown = sorted(k for k in data if k not in options)
    if unknown:
        raise exceptions.OptionsError(f"{source}: unknown option(s): {', '.join(unknown)}")
    listeners = sorted(k for k in data if k in LISTENER_OPTIONS)
    if listeners:
        raise exceptions.OptionsError(
            f"{source}: {', '.join(listeners)} cannot be set here: mitmproxy starts its "
            "listeners before scripts load; pass them on the command line (e.g. --mode reverse:...@5000)"
        )
    return {k: v for k, v in data.items() if not options.has_changed(k)}

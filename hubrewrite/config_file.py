"""``mitm.conf``: a YAML file of mitmproxy options, loaded by the addon.

Precedence is defaults < mitm.conf < command line: a key from the file is
applied unless the command line named that option (``--set key=...``, or a flag
such as ``-k``, ``--certs``, ``-v``), whatever value it gave, mitmproxy's default
included. Which options the command line named is read again from the running
tool's own parser (``mitmseams.tools.command_line_options``): once mitmproxy has
applied them, an option set to its default looks exactly like one never set.

One file serves both mitmdump and mitmweb: a key that only the other tool has
(``flow_detail`` is mitmdump's) is skipped, not an error. A key no mitmproxy
tool knows is an error: a typo must not silently leave a default in place.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mitmproxy import exceptions, optmanager

from .mitmseams.tools import other_tools_options

log = logging.getLogger("hub_rewrite")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "mitm.conf"

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


def options_to_apply(options: optmanager.OptManager, data: dict[str, object], source: str,
                     named: frozenset[str] | None) -> dict[str, object]:
    """Validate the file's keys; return those this tool has and the command line did not set.

    ``named``: the options the command line named; None when unknown (no mitmproxy tool's
    command line: an embedding, the tests), and then an option still at its default counts
    as not set."""
    elsewhere = sorted(k for k in data if k not in options and k in other_tools_options())
    unknown = sorted(k for k in data if k not in options and k not in elsewhere)
    if unknown:
        raise exceptions.OptionsError(f"{source}: unknown option(s): {', '.join(unknown)}")
    if elsewhere:
        log.info("hub_rewrite: %s: %s not used by this mitmproxy tool", source, ", ".join(elsewhere))
    listeners = sorted(k for k in data if k in LISTENER_OPTIONS)
    if listeners:
        raise exceptions.OptionsError(
            f"{source}: {', '.join(listeners)} cannot be set here: mitmproxy starts its "
            "listeners before scripts load; pass them on the command line (e.g. --mode reverse:...@5000)"
        )
    if named is None:
        return {k: v for k, v in data.items() if k in options and not options.has_changed(k)}
    return {k: v for k, v in data.items() if k in options and k not in named}


def apply_config_file(options: optmanager.OptManager, named: frozenset[str] | None) -> str | None:
    """Apply hub_config's file below the command line (``named``: the options it named, None if
    unknown; see mitmseams.tools.command_line_options); the path applied, if any."""
    if not options.hub_config:
        return None
    path = Path(options.hub_config).expanduser()
    if not path.exists():
        if path == DEFAULT_CONFIG:
            return None  # no file next to the addon: defaults and command line only
        raise exceptions.OptionsError(f"hub_config: {path} does not exist")
    data = read_config(path)
    try:
        options.update(**options_to_apply(options, data, str(path), named))
    except (TypeError, ValueError) as e:
        raise exceptions.OptionsError(f"{path}: {e}") from e
    return str(path)

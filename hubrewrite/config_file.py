"""``mitm.conf``: a YAML file of mitmproxy options, loaded by the addon.

Precedence is defaults < mitm.conf < command line: a key from the file is only
applied while the option still has its default value, so ``--set`` wins.

One file serves both mitmdump and mitmweb: a key that only the other tool has
(``flow_detail`` is mitmdump's) is skipped, not an error. A key no mitmproxy
tool knows is an error: a typo must not silently leave a default in place.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from mitmproxy import exceptions, optmanager

log = logging.getLogger("hub_rewrite")

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
    """Validate the file's keys; return those this tool has and the command line did not set."""
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
    return {k: v for k, v in data.items() if k in options and not options.has_changed(k)}


class _Loader:
    """Just enough of mitmproxy's addon loader for an addon to declare its options."""

    def __init__(self, options: optmanager.OptManager) -> None:
        self.options = options

    def add_option(self, name, typespec, default, help, choices=None) -> None:
        self.options.add_option(name, typespec, default, help, choices)


@functools.cache
def other_tools_options() -> frozenset[str]:
    """Options of mitmdump's and mitmweb's own addons (whichever tool is running)."""
    from mitmproxy.addons import dumper
    from mitmproxy.tools.web import webaddons

    scratch = optmanager.OptManager()
    for addon in (dumper.Dumper(), webaddons.WebAddon()):
        addon.load(_Loader(scratch))
    return frozenset(scratch.keys())

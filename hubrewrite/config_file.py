"""``mitm.conf``: a YAML file of mitmproxy options, loaded by the addon.

Precedence is defaults < mitm.conf < command line: a key from the file is
applied unless the command line named that option (``--set key=...``, or a flag
such as ``-k``, ``--certs``, ``-v``), whatever value it gave, mitmproxy's default
included. Which options the command line named is read again from the running
tool's own parser (``command_line_options``): once mitmproxy has applied them,
an option set to its default looks exactly like one never set.

One file serves both mitmdump and mitmweb: a key that only the other tool has
(``flow_detail`` is mitmdump's) is skipped, not an error. A key no mitmproxy
tool knows is an error: a typo must not silently leave a default in place.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Sequence
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


# The running master's class -> the mitmproxy.tools.cmdline parser its command line was read with.
TOOL_PARSERS = {
    "mitmproxy.tools.dump.DumpMaster": "mitmdump",
    "mitmproxy.tools.web.master.WebMaster": "mitmweb",
    "mitmproxy.tools.console.master.ConsoleMaster": "mitmproxy",
}
# Parser destinations that are not options, and the options mitmproxy.tools.main sets from them.
IMPLIED_OPTIONS = {
    "version": (), "options": (), "commands": (), "setoptions": (),  # --set: its specs name options
    "quiet": ("termlog_verbosity", "flow_detail"),
    "verbose": ("termlog_verbosity", "flow_detail"),
    "filter_args": ("save_stream_filter", "readfile_filter", "dumper_filter"),  # mitmdump's filter
}


def command_line_options(master, argv: Sequence[str] | None = None) -> frozenset[str] | None:
    """The options the command line of the running mitmproxy tool named; None if unknown.

    mitmproxy.tools.main parses ``sys.argv`` with the tool's parser from
    mitmproxy.tools.cmdline, applies ``--set`` specs and every flag that maps to an
    option (``-k``, ``--certs``, ``--mode``, ``-s``, ``-v``, ...), and keeps no record
    of which; the same parser, built on the running options, reads it again.
    """
    argv = list(sys.argv if argv is None else argv)
    tool = next((TOOL_PARSERS[n] for n in _class_names(master) if n in TOOL_PARSERS), None)
    if tool is None or not argv or not Path(argv[0]).name.startswith(tool):
        return None  # not started from that tool's command line
    from mitmproxy.tools import cmdline

    parser = getattr(cmdline, tool)(master.options)
    try:
        args = vars(parser.parse_args(argv[1:]))
    except SystemExit:
        return None
    strangers = sorted(k for k in args if k not in master.options and k not in IMPLIED_OPTIONS)
    if strangers:
        log.warning("hub_rewrite: mitmproxy's command line has %s, unknown to hub_rewrite: an option "
                    "given on the command line with its default value may lose to mitm.conf", ", ".join(strangers))
        return None
    named = {spec.partition("=")[0] for spec in args["setoptions"]}
    named.update(k for k, v in args.items() if k in master.options and v is not None)
    named.update(o for k, implied in IMPLIED_OPTIONS.items() if args.get(k) for o in implied)
    return frozenset(named)


def _class_names(master) -> list[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in type(master).__mro__]


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

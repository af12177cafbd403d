"""mitmproxy's tools (mitmdump, mitmweb, the console): which one runs, its command line, its start.

Relies on: the tools' master classes (``mitmproxy.tools.dump.DumpMaster``, ...), their
command-line parsers in ``mitmproxy.tools.cmdline`` and how ``mitmproxy.tools.main``
turns what they parsed into options (``IMPLIED_OPTIONS``), the options only one tool's
addons declare (mitmweb's ``web_port``, the console's ``console_layout``, mitmdump's
dumper's), and mitmdump's entry point ``mitmproxy.tools.main.mitmdump(args)``.
Why: an addon is not told which tool loaded it, nor which options the command line
named (once applied, an option given its default looks like one never set, and
mitm.conf must not win over it); the check command runs mitmdump in its own
process (hubrewrite/check.py).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mitmproxy import optmanager

log = logging.getLogger("hub_rewrite")

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


def is_mitmweb(options: optmanager.OptManager) -> bool:
    """mitmweb runs (its web addon declares ``web_port``)."""
    return "web_port" in options


def keeps_every_flow(options: optmanager.OptManager) -> bool:
    """The tool keeps every flow for people to read: mitmweb or the console (their addons
    declare ``web_port``, ``console_layout``)."""
    return "web_port" in options or "console_layout" in options


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


def run_mitmdump(args: list[str]) -> None:
    """mitmdump in this process, with ``args`` as its command line (without the program's name);
    it exits the process itself (status 1) when its options or an addon fail."""
    from mitmproxy.tools.main import mitmdump

    mitmdump(args)

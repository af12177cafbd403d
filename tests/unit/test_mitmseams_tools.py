"""mitmseams/tools.py: which tool runs, which options its command line named, mitmdump's start.

``command_line_options`` re-reads the command line with mitmproxy's own parsers
(mitmproxy.tools.cmdline) and knows how mitmproxy.tools.main turns their results into
options. These tests run it on real mitmdump and mitmweb masters, so a change in
mitmproxy's command line (a new flag that is not an option, a flag mapped differently)
fails here, naming the seam, rather than letting mitm.conf silently win over the
command line.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from mitmproxy import options, optmanager, version
from mitmproxy.test import taddons

from hubrewrite.addon import HubRewrite
from hubrewrite.mitmseams import tools
from hubrewrite.mitmseams.tools import command_line_options
from hubrewrite.config_file import REPO_ROOT
from tests.unit.seamcheck import seam


def master_of(tool: str):
    """A master as mitmproxy.tools.main makes it (with the mirror's addon loaded)."""
    async def make():
        if tool == "mitmdump":
            from mitmproxy.tools.dump import DumpMaster

            master = DumpMaster(options.Options(), with_termlog=False)
        else:
            from mitmproxy.tools.web.master import WebMaster

            master = WebMaster(options.Options(), with_termlog=False)
        return master

    master = asyncio.run(make())
    master.addons.add(HubRewrite())  # its options, as -s loads them
    return master


@pytest.mark.parametrize("tool", ["mitmdump", "mitmweb"])
def test_every_flag_of_the_tools_is_an_option_or_known(tool):
    """No flag of the tool's parser that hub_rewrite does not know how mitmproxy maps."""
    with seam("tools.command_line_options (TOOL_PARSERS, IMPLIED_OPTIONS)"):
        assert command_line_options(master_of(tool), [f"/venv/bin/{tool}"]) == frozenset()


def test_flags_and_set_specs_are_named_whatever_their_values():
    argv = ["/venv/bin/mitmdump", "-s", "addons/hub_rewrite.py", "--mode", "reverse:https://x@5000", "-k",
            "--certs", "*=mirror.pem", "-v", "--http2", "--set", "tcp_timeout=600", "--set", "block_global=true",
            "--set", "hub_upstream_timeout=30", "--set", "keep_host_header", "~q"]
    with seam("tools.command_line_options"):
        named = command_line_options(master_of("mitmdump"), argv)
    assert named == {
        "scripts", "mode", "ssl_insecure", "certs", "http2",  # flags
        "termlog_verbosity", "flow_detail",  # -v
        "tcp_timeout", "block_global", "hub_upstream_timeout", "keep_host_header",  # --set
        "save_stream_filter", "readfile_filter", "dumper_filter",  # mitmdump's filter argument
    }


def test_mitmweb_flags():
    argv = ["mitmweb", "--web-port", "8081", "--no-web-open-browser", "-q", "--set", "http2=false"]
    with seam("tools.command_line_options"):
        named = command_line_options(master_of("mitmweb"), argv)
        assert named == {"web_port", "web_open_browser", "termlog_verbosity", "flow_detail", "http2"}


def test_unknown_when_not_a_tools_command_line():
    assert command_line_options(master_of("mitmdump"), ["/usr/bin/pytest", "-x"]) is None
    assert command_line_options(master_of("mitmweb"), ["/venv/bin/mitmdump"]) is None
    with taddons.context() as tctx:
        assert command_line_options(tctx.master, ["/venv/bin/mitmdump"]) is None


def test_the_tools_are_told_apart_by_their_addons_options():
    from mitmproxy.tools.console.consoleaddons import ConsoleAddon

    console = optmanager.OptManager()
    ConsoleAddon(None).load(tools._Loader(console))
    dump, web = master_of("mitmdump").options, master_of("mitmweb").options
    with seam("tools.is_mitmweb, tools.keeps_every_flow"):
        assert tools.is_mitmweb(web) and not tools.is_mitmweb(dump) and not tools.is_mitmweb(console)
        assert tools.keeps_every_flow(web) and tools.keeps_every_flow(console) and not tools.keeps_every_flow(dump)


def test_options_only_the_other_tool_has():
    with seam("tools.other_tools_options"):
        others = tools.other_tools_options()
        assert {"flow_detail", "dumper_filter", "web_port", "web_open_browser"} <= others
        assert not others & set(options.Options().keys())  # none of the core's


def test_mitmdump_runs_from_its_entry_point():
    """In a process of its own: mitmdump's master takes over the process's logging."""
    code = "from hubrewrite.mitmseams.tools import run_mitmdump; run_mitmdump(['--version'])"
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    with seam("tools.run_mitmdump (mitmproxy.tools.main.mitmdump)"):
        assert ran.returncode == 0 and f"Mitmproxy: {version.VERSION}" in ran.stdout, ran.stderr

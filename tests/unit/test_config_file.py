"""config_file.command_line_options: which options the running tool's command line named.

It re-reads the command line with mitmproxy's own parsers (mitmproxy.tools.cmdline) and
knows how mitmproxy.tools.main turns their results into options. These tests run it on
real mitmdump and mitmweb masters, so a change in mitmproxy's command line (a new flag
that is not an option, a flag mapped differently) fails here, loudly, rather than letting
mitm.conf silently win over the command line.
"""

from __future__ import annotations

import asyncio

import pytest
from mitmproxy import options
from mitmproxy.test import taddons

from hubrewrite.addon import HubRewrite
from hubrewrite.config_file import command_line_options


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
    assert command_line_options(master_of(tool), [f"/venv/bin/{tool}"]) == frozenset()


def test_flags_and_set_specs_are_named_whatever_their_values():
    argv = ["/venv/bin/mitmdump", "-s", "addons/hub_rewrite.py", "--mode", "reverse:https://x@5000", "-k",
            "--certs", "*=mirror.pem", "-v", "--http2", "--set", "tcp_timeout=600", "--set", "block_global=true",
            "--set", "hub_upstream_timeout=30", "--set", "keep_host_header", "~q"]
    named = command_line_options(master_of("mitmdump"), argv)
    assert named == {
        "scripts", "mode", "ssl_insecure", "certs", "http2",  # flags
        "termlog_verbosity", "flow_detail",  # -v
        "tcp_timeout", "block_global", "hub_upstream_timeout", "keep_host_header",  # --set
        "save_stream_filter", "readfile_filter", "dumper_filter",  # mitmdump's filter argument
    }


def test_mitmweb_flags():
    argv = ["mitmweb", "--web-port", "8081", "--no-web-open-browser", "-q", "--set", "http2=false"]
    named = command_line_options(master_of("mitmweb"), argv)
    assert named == {"web_port", "web_open_browser", "termlog_verbosity", "flow_detail", "http2"}


def test_unknown_when_not_a_tools_command_line():
    assert command_line_options(master_of("mitmdump"), ["/usr/bin/pytest", "-x"]) is None
    assert command_line_options(master_of("mitmweb"), ["/venv/bin/mitmdump"]) is None
    with taddons.context() as tctx:
        assert command_line_options(tctx.master, ["/venv/bin/mitmdump"]) is None

"""mitmseams/logs.py's terminal log and mitmseams/dumper.py against the installed mitmproxy's
own TermLogHandler and Dumper: a failure names the seam."""

from __future__ import annotations

import io
import json
import logging

from mitmproxy.addons import dumper
from mitmproxy.addons.termlog import TermLogHandler
from mitmproxy.test import taddons, tflow

from hubrewrite.debug.redact import redacted
from hubrewrite.mitmseams import dumper as dumper_seam
from hubrewrite.mitmseams import logs
from hubrewrite.observe.logformat import JsonLines
from tests.unit.seamcheck import seam


def test_the_terminal_log_takes_a_formatter_and_gives_it_back():
    out = io.StringIO()
    handler = TermLogHandler(out)
    handler.install()
    try:
        with seam("logs.set_termlog_formatter"):
            logs.set_termlog_formatter(JsonLines())
            logging.getLogger("hub_rewrite").warning("as json")
            logs.set_termlog_formatter(None)
            logging.getLogger("hub_rewrite").warning("as text")
    finally:
        handler.uninstall()
    json_line, text_line = out.getvalue().splitlines()[-2:]
    with seam("logs.set_termlog_formatter"):
        assert json.loads(json_line)["message"] == "as json"
        assert text_line.startswith("[") and text_line.endswith("] as text")


def test_mitmdumps_flow_lines_go_through_the_replacement_and_back():
    out = io.StringIO()
    printer = dumper.Dumper(out)
    with taddons.context(printer) as tctx, seam("dumper.print_lines_as"):
        tctx.configure(printer, flow_detail=1)
        dumper_seam.print_lines_as(lambda text: "R:" + text.strip())
        printer.response(tflow.tflow(resp=True))
        replaced = out.getvalue().splitlines()
        dumper_seam.print_lines_as(None)
        printer.response(tflow.tflow(resp=True))
        assert replaced and all(line.startswith("R:") for line in replaced)
        assert "GET" in replaced[0] and "<< 200" in replaced[-1]
        restored = out.getvalue().splitlines()[len(replaced):]
        assert restored and not any(line.startswith("R:") for line in restored)


def test_mitmdump_prints_the_flow_it_is_handed():
    out = io.StringIO()
    printer = dumper.Dumper(out)
    flow = tflow.tflow(resp=True)
    flow.request.headers["Authorization"] = "Bearer secret-token"
    failed = tflow.tflow(err=True)
    handed = []

    def transform(f):
        handed.append(f)
        return redacted(f)

    with taddons.context(printer) as tctx, seam("dumper.print_flows_as"):
        tctx.configure(printer, flow_detail=2)
        dumper_seam.print_flows_as(transform)
        dumper_seam.print_flows_as(lambda f: f)  # a second call changes nothing
        printer.response(flow)
        printer.error(failed)
        printed = out.getvalue()
        assert handed == [flow, failed]  # every flow the dumper prints, through the one transform
        assert "authorization" in printed.lower() and "secret-token" not in printed
        assert flow.request.headers["Authorization"] == "Bearer secret-token"  # the flow itself unchanged

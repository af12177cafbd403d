"""What mitmdump's dumper prints of each flow: redacted copies, JSON lines.

Relies on: the addon named "dumper" (mitmdump has it, mitmweb not), its
``echo_flow(flow)`` method, through which its ``response``, ``error`` and
``http_connect_error`` hooks print a flow, its ``echo(text, ident=None, **style)``
method, through which every line goes out, its ``outfp``, and the module's
``indent``. An instance attribute of a method's name takes the method's place.
Why: the dumper prints the flow object every addon shares, credentials included
(hooks cannot hand it another one), as text (it has no formatter to replace).
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import ctx, http
from mitmproxy.addons import dumper as dumper_addon


def _dumper():
    master = getattr(ctx, "master", None)
    return master.addons.get("dumper") if master is not None else None


def print_flows_as(transform: Callable[[http.HTTPFlow], http.HTTPFlow]) -> None:
    """Hand the dumper ``transform(flow)`` instead of each flow it prints (once: a second call
    changes nothing, ``transform`` decides per flow)."""
    dumper = _dumper()
    if dumper is None or getattr(dumper.echo_flow, "hub_transformed", False):
        return
    original = dumper.echo_flow

    def echo_flow(flow: http.HTTPFlow) -> None:
        original(transform(flow))

    echo_flow.hub_transformed = True
    dumper.echo_flow = echo_flow


def print_lines_as(render: Callable[[str], str] | None) -> None:
    """Print each of the dumper's lines as ``render(text)`` instead; None: as mitmdump does
    (removing the instance attribute brings the method back)."""
    dumper = _dumper()
    if dumper is None:
        return  # mitmweb: no flow lines
    if render is None:
        dumper.__dict__.pop("echo", None)
        return

    def echo(text: str, ident=None, **style) -> None:
        if ident:
            text = dumper_addon.indent(ident, text)
        print(render(text), file=dumper.outfp)

    dumper.echo = echo

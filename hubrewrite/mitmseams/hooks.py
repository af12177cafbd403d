"""A flow the mirror made, through every addon's hooks, as if mitmproxy had seen it.

Relies on: ``eventsequence.iterate(flow)`` (the hooks of a flow's life, in order) and
the addon manager's ``handle_lifecycle`` (runs one hook in every addon, then
``update``), which is how mitmproxy shows a flow read from a file
(``Master.load_flow``, without its reverse-mode rewrite of the request's host).
Why: nothing public adds a flow that no client connection carried; the mirror's own
upstream exchanges are shown in mitmweb and saved with ``-w`` this way
(debug/sideflows.py).
"""

from __future__ import annotations

from mitmproxy import ctx, eventsequence, http


async def run_hooks(flow: http.HTTPFlow) -> None:
    """Every hook of the flow's life, in every addon (mitmweb's view shows it, save_stream_file
    writes it, the dumper prints it)."""
    for event in eventsequence.iterate(flow):
        await ctx.master.addons.handle_lifecycle(event)

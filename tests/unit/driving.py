"""Drive the addon's hooks as mitmproxy does for one request."""

from __future__ import annotations

import inspect

import httpx
from mitmproxy import http
from mitmproxy.flow import Error

from .as_mitmproxy import fetch


async def hook(addon, name: str, *args) -> None:
    """A hook as mitmproxy invokes it: the addon first, then its sub-addons (``addons``)."""
    for target in (addon, *getattr(addon, "addons", ())):
        method = getattr(target, name, None)
        if method is not None:
            result = method(*args)
            if inspect.isawaitable(result):
                await result


async def drive(addon, flow: http.HTTPFlow) -> http.HTTPFlow:
    """requestheaders, then request (mitmproxy calls it once the body is in); a flow
    left pointed at the mirror's loopback server for a prepared answer, or for a blob the
    mirror streams without a cache, gets it from there, body sent, as mitmproxy would fetch
    it (a transfer ended short is the flow's error)."""
    await hook(addon, "requestheaders", flow)
    await hook(addon, "request", flow)
    loopback = addon.mirror.loopback if addon.mirror else None
    if (flow.response is None and loopback is not None and flow.request.port == loopback.server.port
            and flow.request.path.startswith(("/answers/", "/streams/"))):
        try:
            answer = await fetch(flow)
        except (httpx.HTTPError, OSError) as e:
            flow.error = Error(f"{type(e).__name__}: {e}")
            return flow
        flow.response = http.Response.make(answer.status_code, answer.content, list(answer.headers.raw))
    return flow

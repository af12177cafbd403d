"""One module per request path, each turning a ``ClientRequest`` into one answer:
a response, or a ``Retarget`` mitmproxy streams."""

from __future__ import annotations

from ..mirror import Mirror
from ..client_request import Answer, ClientRequest, RequestKind, Retarget
from ..registry.names import RouteKind
from ..responses import PREFLIGHT_HEADERS, make_response
from . import ahead, blobs, manifests, pages, relay, token_endpoint


async def serve(request: ClientRequest, mirror: Mirror) -> Answer:
    if request.kind is RequestKind.PREFLIGHT:
        return make_response(204, PREFLIGHT_HEADERS)
    if request.kind is RequestKind.PAGE:
        return await pages.serve(request, mirror)
    if request.kind is RequestKind.TOKEN:
        return await token_endpoint.serve(request, mirror)
    route = request.route
    if request.method not in ("GET", "HEAD"):
        # a push the operator allowed: the registry itself gets it, body streamed
        return Retarget(request.url, keep_credentials=True)
    if route.kind is RouteKind.BLOB:
        return await blobs.serve(request, mirror)
    if route.kind is RouteKind.MANIFEST and mirror.cache is not None:
        answer = await manifests.serve(request, mirror)
        ahead.after_manifest(request, mirror, answer)
        return answer
    return await relay.serve(request, mirror)

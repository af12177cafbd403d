"""One module per request path, each turning a ``Pull`` into one answer:
a response, or a ``Retarget`` mitmproxy streams."""

from __future__ import annotations

from ..mirror import Mirror
from ..pull import Answer, Pull, RequestKind, Retarget
from ..registry.names import RouteKind
from ..responses import PREFLIGHT_HEADERS, make_response
from . import ahead, blobs, manifests, pages, relay, token_endpoint


async def serve(pull: Pull, mirror: Mirror) -> Answer:
    if pull.kind is RequestKind.PREFLIGHT:
        return make_response(204, PREFLIGHT_HEADERS)
    if pull.kind is RequestKind.PAGE:
        return await pages.serve(pull, mirror)
    if pull.kind is RequestKind.TOKEN:
        return await token_endpoint.serve(pull, mirror)
    route = pull.route
    if pull.method not in ("GET", "HEAD"):
        # a push the operator allowed: the registry itself gets it, body streamed
        return Retarget(pull.url, keep_credentials=True)
    if route.kind is RouteKind.BLOB:
        return await blobs.serve(pull, mirror)
    if route.kind is RouteKind.MANIFEST and mirror.cache is not None:
        answer = await manifests.serve(pull, mirror)
        ahead.after_manifest(pull, mirror, answer)
        return answer
    return await relay.serve(pull, mirror)

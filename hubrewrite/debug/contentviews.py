"""mitmproxy content views for registry traffic, picked by mitmproxy's ``auto`` view.

Four views: manifests and indexes, token answers, 401 challenges and token
requests. Each one decides in ``render_priority`` by trying to summarize the
message: a summary means priority 2 (above mitmproxy's JSON and URL-encoded
views, which give such bodies 1); a body it cannot read means -1, so ``auto``
shows it as JSON or raw text as usual. The views never raise, since mitmproxy 12
handles that poorly: an exception in ``render_priority`` is logged with a
traceback, one in ``prettify`` replaces the view by Raw with a "failed to parse"
note (under ``auto``) or shows the traceback (view picked by hand). Picked by
hand on a body it cannot read, a view says so in one line instead.

``register()`` adds them (the addon calls it when it loads; calling it again
replaces them, views are keyed by name); ``unregister()`` removes them.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

from mitmproxy import contentviews, http
from mitmproxy.contentviews import Contentview, Metadata

from hubrewrite.debug import challenges, manifests, token_requests, tokens
from hubrewrite.mitmseams.contentviews import remove_view

SUMMARY_PRIORITY = 2.0
NOT_MINE = -1.0

MAX_MANIFEST_BYTES = 4 << 20  # distribution refuses bigger manifests
MAX_TOKEN_ANSWER_BYTES = 64 << 10  # a token answer is a few KB, even with an x5c chain

_MANIFEST_PATH = re.compile(r"^/v2/.+/manifests/[^/?]+(\?|$)")
# Docker Hub /token, the mirror's /token/<registry>, quay.io /v2/auth, nvcr.io /proxy_auth, mcr /oauth2/token
_TOKEN_PATH = re.compile(r"(token|auth)", re.IGNORECASE)
_FORM = "application/x-www-form-urlencoded"


class _SummaryView(Contentview):
    """A view that shows a text summary when ``summarize`` can make one."""

    what: str  # for the note shown when the view is picked by hand on something else

    def summarize(self, data: bytes, metadata: Metadata) -> str | None:
        raise NotImplementedError

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        return SUMMARY_PRIORITY if self.summarize(data, metadata) is not None else NOT_MINE

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        summary = self.summarize(data, metadata)
        if summary is None:
            return f"This is not {self.what}; the JSON or Raw view shows it as it is."
        return summary


class ManifestView(_SummaryView):
    name = "Registry manifest"
    what = "a registry manifest or index"

    def summarize(self, data: bytes, metadata: Metadata) -> str | None:
        if metadata.http_message is None or not data or len(data) > MAX_MANIFEST_BYTES:
            return None
        if metadata.content_type not in manifests.MANIFEST_TYPES and not _on_manifest_path(metadata):
            return None
        doc = _json(data)
        media_type = manifests.media_type_of(doc, metadata.content_type)
        return manifests.describe(doc, media_type) if media_type else None


class TokenAnswerView(_SummaryView):
    name = "Registry token"
    what = "a token answer"

    def summarize(self, data: bytes, metadata: Metadata) -> str | None:
        if not isinstance(metadata.http_message, http.Response) or len(data) > MAX_TOKEN_ANSWER_BYTES:
            return None
        if not data.lstrip().startswith(b"{"):
            return None
        return tokens.describe_answer(_json(data))


class ChallengeView(_SummaryView):
    name = "Registry challenge"
    what = "a 401 answer with a WWW-Authenticate challenge"

    def summarize(self, data: bytes, metadata: Metadata) -> str | None:
        response = metadata.http_message
        if not isinstance(response, http.Response) or response.status_code != 401:
            return None
        values = response.headers.get_all("www-authenticate")
        return challenges.describe(values, data) if values else None


class TokenRequestView(_SummaryView):
    name = "Registry token request"
    what = "a token request"

    def summarize(self, data: bytes, metadata: Metadata) -> str | None:
        request = metadata.http_message
        if not isinstance(request, http.Request) or not _TOKEN_PATH.search(request.path.split("?")[0]):
            return None
        params = list(request.query.items(multi=True))
        if data and metadata.content_type == _FORM:
            params += urllib.parse.parse_qsl(data.decode("utf-8", "replace"), keep_blank_values=True)
        if not token_requests.is_token_request(params):
            return None
        return token_requests.describe_request(params, request.headers.get("authorization"))


VIEWS: tuple[_SummaryView, ...] = (ManifestView(), TokenAnswerView(), ChallengeView(), TokenRequestView())


def register() -> None:
    for view in VIEWS:
        contentviews.add(view)


def unregister() -> None:
    """Remove our views (not a view that replaced one of them)."""
    for view in VIEWS:
        remove_view(view)


def _on_manifest_path(metadata: Metadata) -> bool:
    flow = metadata.flow
    return isinstance(flow, http.HTTPFlow) and bool(_MANIFEST_PATH.match(flow.request.path))


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None

"""A small client for the REST API of a running mitmweb (mitmproxy 12).

    api = MitmwebApi("http://127.0.0.1:8081", web_password)
    api.flows()                               # GET /flows.json: every flow, as mitmweb's JSON
    api.content(flow_id, "response", "auto")  # GET /flows/ID/response/content/auto.json

Authentication, as mitmproxy/tools/web/app.py (AuthRequestHandler) does it:
every handler takes the password either as ``Authorization: Bearer PW`` or as
``?token=PW``; no cookie is needed.  A request that passes gets a signed
``mitmproxy-auth-<web_port>`` cookie, which is what the browser UI lives on
afterwards (its ``/updates`` websocket carries no token).  Tornado's XSRF
check only applies to POST/PUT/DELETE, and this client only reads.  It sends
the header, so the password never appears in a URL, and so never in an
exception message or a test report.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

MESSAGE_PARTS = ("request", "response")


class MitmwebApiError(RuntimeError):
    pass


class MitmwebApi:
    def __init__(self, base_url: str, password: str, timeout: float = 10) -> None:
        self.base_url = base_url.rstrip("/")
        self._password = password
        self._client = httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {password}"}, timeout=timeout
        )

    def close(self) -> None:
        self._client.close()

    @property
    def ui_url(self) -> str:
        """The UI for a browser: the token in the query, as mitmweb prints it when it picks the password itself."""
        return f"{self.base_url}/?token={quote(self._password)}"

    def _get_json(self, path: str) -> Any:
        response = self._client.get(path)
        if response.status_code != 200:
            raise MitmwebApiError(f"GET {path}: mitmweb answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def flows(self) -> list[dict[str, Any]]:
        """Every flow mitmweb holds, oldest first."""
        return self._get_json("/flows.json")

    def content(self, flow_id: str, part: str, view: str = "auto") -> dict[str, Any]:
        """One message body as rendered by a content view: ``text``, ``view_name``
        (the view actually used; ``auto`` picks one), ``syntax_highlight``, ``description``."""
        if part not in MESSAGE_PARTS:
            raise ValueError(f"part must be one of {MESSAGE_PARTS}, not {part!r}")
        return self._get_json(f"/flows/{quote(flow_id)}/{part}/content/{quote(view)}.json")

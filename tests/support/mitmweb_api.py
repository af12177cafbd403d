"""A small client for the REST API of a running mitmweb (mitmproxy 12).

    api = MitmwebApi("http://127.0.0.1:8081", web_password)
    api.flows()                               # GET /flows.json: every flow, as mitmweb's JSON
    api.content(flow_id, "response", "auto")  # GET /flows/ID/response/content/auto.json
    api.content_data(flow_id, "response")     # GET /flows/ID/response/content.data: the body as mitmweb offers it
    api.dump()                                # GET /flows/dump: every flow in the -w format
    api.get_text("/events.json")              # any other endpoint, as text
    with api.updates() as messages: ...       # the /updates websocket, every message it sent meanwhile

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

import asyncio
import contextlib
import threading
from collections.abc import Iterator
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
        return self._get_json(f"/flows/{quote(flow_id)}/{part}/content/{quote(view, safe='')}.json")

    def get_text(self, path: str) -> str:
        response = self._client.get(path)
        if response.status_code != 200:
            raise MitmwebApiError(f"GET {path}: mitmweb answered {response.status_code}")
        return response.text

    def content_data(self, flow_id: str, part: str) -> bytes:
        """A message body as mitmweb hands it out for download (decoded, as ``get_content`` has it)."""
        if part not in MESSAGE_PARTS:
            raise ValueError(f"part must be one of {MESSAGE_PARTS}, not {part!r}")
        response = self._client.get(f"/flows/{quote(flow_id)}/{part}/content.data")
        if response.status_code != 200:
            raise MitmwebApiError(f"GET content.data of {flow_id}: mitmweb answered {response.status_code}")
        return response.content

    def dump(self) -> bytes:
        """Every flow, serialized as ``-w`` writes them (the UI's "Save")."""
        response = self._client.get("/flows/dump")
        if response.status_code != 200:
            raise MitmwebApiError(f"GET /flows/dump: mitmweb answered {response.status_code}")
        return response.content

    def content_views(self) -> list[str]:
        """The names of every content view mitmweb offers (``/state``)."""
        return self._get_json("/state")["contentViews"]

    @contextlib.contextmanager
    def updates(self) -> Iterator[list[str]]:
        """The UI's ``/updates`` websocket, open for the block: the list fills with every
        message mitmweb pushed (flows as they are added and updated)."""
        messages: list[str] = []
        ready, stop = threading.Event(), threading.Event()
        url = self.base_url.replace("http://", "ws://", 1) + "/updates"
        thread = threading.Thread(target=asyncio.run, args=(self._listen(url, messages, ready, stop),), daemon=True)
        thread.start()
        if not ready.wait(10):
            raise MitmwebApiError("the /updates websocket did not open")
        try:
            yield messages
        finally:
            stop.set()
            thread.join(10)

    async def _listen(self, url: str, messages: list[str], ready: threading.Event, stop: threading.Event) -> None:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        conn = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"Bearer {self._password}"}))
        ready.set()
        try:
            while not stop.is_set():
                try:
                    message = await asyncio.wait_for(conn.read_message(), 0.2)
                except TimeoutError:
                    continue
                if message is None:
                    return
                messages.append(message if isinstance(message, str) else message.decode("utf-8", "replace"))
        finally:
            conn.close()

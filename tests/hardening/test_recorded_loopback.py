"""What a record shows of a blob request the mirror's loopback server answers gets nobody
else anything from that server (issue 17: a recorded flow holds no usable secret).

A client that asks for a blob beyond what the mirror answers from memory (64 KiB) while its
download is running follows the download through the loopback server: its flow is pointed
there in the ``request`` hook, and mitmproxy 12 pushes the flow to mitmweb's ``/updates``
websocket right after that hook, before it sends the request (``addonmanager.handle_lifecycle``).
Here that happens every time: a fresh 1 MiB layer, which the test CDN stops at its middle for
a few seconds (``cutat``); a first client starts the download, a second asks while it stands
still. mitmweb (saving to a file too) records both.

Then, for every state of the two flows any record showed pointed at the loopback server (the
websocket's pushes, the REST API polled while the download stood still), the request exactly as
shown (URL and headers) is sent again from another connection, as anyone who read the record
could: the loopback server must refuse it (it served the blob to the same request from a key
header before). And no text mitmweb's websocket and REST API or the ``-w`` file hold has the
loopback key or any other credential the scan knows.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import httpx
import pytest

from hubrewrite.loopback import PARKED
from tests.support.credential_scan import CredentialScan, flow_texts
from tests.support.mirror import Mirror

from .helpers import anonymous_token, fresh_image
from .test_recorded_secrets import mitmweb_texts

REPO = "team/recorded-follow"
LAYER_SIZE = 1 << 20
STAND_STILL = 2  # seconds the CDN stops at the middle of the layer (below the mirror's upstream timeout)


@pytest.fixture(scope="module")
def recording(upstream, tmp_path_factory):
    """mitmweb with a cache, also saving its flows to a file (``-w``)."""
    work = tmp_path_factory.mktemp("recorded-loopback")
    options = {"hub_cache_dir": str(work / "cache"), "hub_upstream_timeout": "10"}
    with Mirror(work / "m", upstream, tool="mitmweb", options=options,
                extra_args=["-w", str(work / "saved.flows")]) as m:
        m.flows_file = work / "saved.flows"
        yield m


class Pull(threading.Thread):
    """A blob GET through the mirror, read as it arrives: ``started`` once its first bytes are in."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(daemon=True)
        self.url, self.token = url, token
        self.started = threading.Event()
        self.status, self.digest, self.problem = 0, "", ""

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60) as r:
                self.status, sha = r.status_code, hashlib.sha256()
                for chunk in r.iter_raw():
                    sha.update(chunk)
                    self.started.set()
                self.digest = "sha256:" + sha.hexdigest()
        except httpx.HTTPError as e:
            self.problem = f"{type(e).__name__}: {e}"
        finally:
            self.started.set()


def pointed_at_loopback(flow: dict, mirror_port: int) -> bool:
    """Shown pointed at the loopback server; not parked (every flow waits there for the request
    hook, and what that path gets is the same refusal for anyone)."""
    request = flow.get("request") or {}
    return (request.get("host") == "127.0.0.1" and request.get("port") != mirror_port
            and request.get("path") != f"/answers/{PARKED}")


def pushed_flows(messages: list[str]) -> list[dict]:
    flows = []
    for message in messages:
        data = json.loads(message)
        if data.get("type") in ("flows/add", "flows/update"):
            flows.append(data["payload"]["flow"])
    return flows


def replayed(flow: dict) -> int:
    """The request a record showed, sent by someone who read it: the status it gets."""
    request = flow["request"]
    url = f"{request['scheme']}://{request['host']}:{request['port']}{request['path']}"
    headers = [(k, v) for k, v in request["headers"] if k.lower() not in ("content-length", "transfer-encoding")]
    try:
        return httpx.request(request["method"], url, headers=headers, timeout=15).status_code
    except httpx.HTTPError:
        return 0  # nothing answered: nothing got


def test_a_followed_download_as_any_record_shows_it_gets_nobody_the_blob(recording, upstream, tmp_path):
    image = fresh_image(upstream, tmp_path, REPO, size=LAYER_SIZE)
    layer = image["layer_digests"][0]
    url = f"{recording.url}/v2/{REPO}/blobs/{layer}"
    token = anonymous_token(recording.url, REPO)
    api = recording.web_api
    polled: list[dict] = []
    upstream.set_cdn_fault("cutat", times=0, at="0.5", seconds=STAND_STILL)
    try:
        with api.updates() as pushed:
            first = Pull(url, token)
            first.start()
            assert first.started.wait(30), "the first client got no byte"
            second = Pull(url, token)  # while the download stands still at the layer's middle
            second.start()
            while first.is_alive() or second.is_alive():
                polled += api.flows()
                time.sleep(0.1)
            time.sleep(1)  # the last updates on their way
    finally:
        upstream.clear_faults()
    assert [(p.status, p.digest, p.problem) for p in (first, second)] == [(200, layer, "")] * 2

    pushed_states = pushed_flows(pushed)
    at_loopback = [f for f in pushed_states + polled if pointed_at_loopback(f, recording.port)]
    # the situation happened: the websocket showed both flows pointed at the loopback server's /blobs/
    shown = {f["id"] for f in pushed_states if pointed_at_loopback(f, recording.port)
             and f["request"]["path"] == f"/blobs/{layer}"}
    assert len(shown) == 2, "the blob requests were not both shown pointed at the loopback server"

    served = sorted(f"{f['request']['method']} {f['request']['path']} -> {status}"
                    for f in at_loopback if (status := replayed(f)) not in (0, 403))
    scan = CredentialScan(upstream)
    issued = scan.issued()
    texts = [("the /updates websocket", "\n".join(pushed)), ("/flows.json while standing still", json.dumps(polled))]
    texts += [(f"mitmweb {place}", text) for place, text in mitmweb_texts(api)]
    texts += [(f"-w {place}", text) for place, text in flow_texts(recording.flows_file.read_bytes())]
    leaks = sorted(f"{place}: {', '.join(found)}" for place, text in texts if (found := scan.found(text, issued)))
    assert not served and not leaks, (f"a record's request, sent again, was answered: {served}\n"
                                      "usable credentials found:\n" + "\n".join(leaks))

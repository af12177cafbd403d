"""What mitmweb and saved flows keep: redacted tokens that still decode, redaction that does
not depend on a Content-Type or fail on a Content-Encoding, and, while flows are recorded,
answers carrying credentials streamed from the loopback server so that the client gets them
whole and the record redacted (debug/records.py)."""

from __future__ import annotations

import base64
import gzip
import json
import re

import pytest
from mitmproxy import http
from mitmproxy.addons import save
from mitmproxy.contentviews import Metadata
from mitmproxy.test import taddons, tflow

from hubrewrite.addon import HubRewrite
from hubrewrite.debug import records
from hubrewrite.debug.contentviews import TokenAnswerView
from hubrewrite.debug.fingerprint import fingerprint, unsigned_jwt
from hubrewrite.debug.redact import carries_credential, redact_flow, redact_response, redacted_grant
from hubrewrite.debug.tokens import describe_answer
from hubrewrite.registry import jwt
from hubrewrite.responses import make_response

from .driving import hook
from .recording_server import Canned
from .test_addon import after_challenge, make_flow, recording_upstream, run, with_core_addons  # noqa: F401 (fixture)


def b64(doc: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


CLAIMS = {"iss": "auth.docker.io", "sub": "alice", "aud": "registry.docker.io", "iat": 1700000000,
          "exp": 1700000300, "access": [{"type": "repository", "name": "library/alpine", "actions": ["pull"]}]}
SIGNATURE = "S" * 342  # an RS256 signature's length
JWT = f"{b64({'alg': 'RS256', 'typ': 'JWT'})}.{b64(CLAIMS)}.{SIGNATURE}"
# Docker Hub's answer: no scope (refresh_token only for offline requests)
HUB_ANSWER = json.dumps({"token": JWT, "access_token": JWT, "expires_in": 300,
                         "issued_at": "2023-11-14T22:13:20.000000Z"}).encode()


def test_a_redacted_jwt_still_decodes_and_is_never_the_token():
    redacted = unsigned_jwt(JWT)
    decoded = jwt.decode(redacted)
    assert decoded is not None and decoded.claims == CLAIMS and decoded.header["alg"] == "RS256"
    head, _, signature = redacted.rpartition(".")
    assert head == JWT.rpartition(".")[0] and signature != SIGNATURE
    assert re.fullmatch(r"[0-9a-f]{12}", signature)  # base64url (hex digits are), the fingerprint's digits
    assert base64.urlsafe_b64decode(signature) and len(base64.urlsafe_b64decode(signature)) == 9
    # the same digits wherever the token shows: the Authorization carrying it, the record of its answer
    assert fingerprint(f"Bearer {JWT}") == f"Bearer <hmac:{signature}>"
    assert fingerprint(redacted) == fingerprint(JWT) == f"JWT <hmac:{signature}>"
    assert unsigned_jwt(redacted) == redacted  # redacting again changes nothing


def test_fingerprints_are_stable_under_redaction_twice():
    for secret in (f"Bearer {JWT}", "Basic " + base64.b64encode(b"alice:pw").decode(), "opaque-refresh", JWT):
        once = fingerprint(secret)
        assert fingerprint(once) == once


def test_token_view_shows_the_claims_of_docker_hubs_answer_shape():
    """The #18 defect: a redacted Docker Hub answer (no scope) showed "token: opaque"."""
    record = redacted_grant(HUB_ANSWER)
    assert JWT not in record.decode() and SIGNATURE not in record.decode()
    text = describe_answer(json.loads(record))
    assert "opaque" not in text
    assert f"token: {fingerprint(JWT)}, signature not shown" in text
    assert "subject (sub): alice" in text and "repository:library/alpine:pull" in text
    assert "scope" not in text
    view = TokenAnswerView()
    response = http.Response.make(200, record, {"Content-Type": "application/json"})
    flow = tflow.tflow(resp=response)
    metadata = Metadata(flow=flow, http_message=response, content_type="application/json")
    assert view.render_priority(record, metadata) > 1 and view.prettify(record, metadata) == text


@pytest.mark.parametrize("content_type", ["application/json", "text/plain; charset=utf-8", ""])
def test_token_answers_are_redacted_whatever_their_content_type(content_type):
    response = http.Response.make(200, HUB_ANSWER, {"Content-Type": content_type} if content_type else {})
    assert carries_credential(response)
    redact_response(response)
    assert SIGNATURE not in response.get_text() and jwt.decode(json.loads(response.content)["token"])


def encoded(raw: bytes) -> http.Response:
    response = http.Response.make(200, b"", {"Content-Encoding": "gzip"})
    response.raw_content = raw
    return response


def test_an_encoded_body_is_read_and_a_broken_one_left_without_an_exception():
    gzipped = encoded(gzip.compress(HUB_ANSWER))
    redact_response(gzipped)
    assert gzipped.headers["content-encoding"] == "gzip" and gzipped.raw_content[:2] == b"\x1f\x8b"
    assert SIGNATURE.encode() not in gzipped.content and jwt.decode(json.loads(gzipped.content)["token"])
    broken = encoded(b"\x1f\x8bnot gzip at all")
    redact_response(broken)  # nothing it can read: left as it is
    assert broken.raw_content == b"\x1f\x8bnot gzip at all"


def test_a_token_form_without_content_type_and_proxyauths_password():
    flow = tflow.tflow()
    flow.request.content = b"grant_type=password&username=alice&password=s3cret&refresh_token=r3fresh"
    flow.metadata["proxyauth"] = ("puller", "proxy-pw")
    redact_flow(flow)
    body = flow.request.get_text()
    assert "s3cret" not in body and "r3fresh" not in body and "username=alice" in body
    assert flow.metadata["proxyauth"] == ("puller", fingerprint("proxy-pw"))


def test_what_carries_a_credential():
    signed = "https://mirror.example:5001/blobs/sha256:aa?expires=1700000300&signature=" + "a" * 64
    assert carries_credential(make_response(307, [("Location", signed)]))
    assert carries_credential(make_response(200, [], json.dumps({"token": "hub1.sealed"}).encode()))
    assert not carries_credential(make_response(307, [("Location", "/v2/x/blobs/sha256:aa?_hub_retry=1")]))
    assert not carries_credential(make_response(401, [("WWW-Authenticate", 'Bearer realm="http://m/token"')]))
    assert not carries_credential(make_response(200, [], b'{"schemaVersion":2,"layers":[]}'))
    redirect = make_response(307, [("Location", signed)])
    assert records.hideable(redirect, "HEAD") is None  # no body: it could not be streamed
    assert records.hideable(redirect, "GET").raw_content == records.REDIRECT_BODY  # a streamed answer needs one


@pytest.fixture
def recording(tmp_path):
    """The addon while mitmdump -w records flows (save_stream_file)."""
    addon = HubRewrite()
    with taddons.context(*with_core_addons(addon), save.Save()) as tctx:
        tctx.configure(addon, hub_config="", save_stream_file=str(tmp_path / "flows"))
        yield addon


def test_while_recorded_a_token_answer_reaches_the_client_whole_and_its_record_redacted(recording, recording_upstream):
    addon = recording
    assert addon.mirror.settings.records_flows
    recording_upstream.routes[("GET", "/auth/token")] = Canned(200, [("Content-Type", "application/json")], HUB_ANSWER)
    flow = make_flow(recording_upstream.url, "GET", "/token?service=test-registry&scope=repository:nginx:pull",
                     headers=[("Authorization", "Basic YWxpY2U6cHc=")])
    after_challenge(addon, recording_upstream, recording_upstream.url + "/auth/token", flow)
    # the flow was sent to the loopback server, and from there (drive fetched it as mitmproxy would)
    assert flow.metadata["hub_client_url"].endswith("/token?service=test-registry&scope=repository:nginx:pull")
    assert flow.response.content == HUB_ANSWER  # what the client gets
    assert flow.request.headers["authorization"] == fingerprint("Basic YWxpY2U6cHc=")  # since requestheaders

    async def answered():
        await hook(addon, "responseheaders", flow)
        assert flow.response.stream  # streamed: its bytes leave before the response hook
        await hook(addon, "response", flow)

    run(answered())
    record = json.loads(flow.response.content)
    assert record["token"] == unsigned_jwt(JWT) and SIGNATURE not in flow.response.get_text()
    assert flow.request.path == "/token?service=test-registry&scope=repository:nginx:pull"


def test_not_recorded_the_answer_is_made_as_before(recording_upstream):
    addon = HubRewrite()
    with taddons.context(*with_core_addons(addon)) as tctx:
        tctx.configure(addon, hub_config="")
        assert not addon.mirror.settings.records_flows
        recording_upstream.routes[("GET", "/auth/token")] = Canned(200, [("Content-Type", "application/json")], HUB_ANSWER)
        flow = make_flow(recording_upstream.url, "GET", "/token?service=test-registry")
        after_challenge(addon, recording_upstream, recording_upstream.url + "/auth/token", flow)
        assert flow.response.content == HUB_ANSWER and not flow.response.stream
        assert "hub_client_url" not in flow.metadata or "/answers/" not in flow.request.path

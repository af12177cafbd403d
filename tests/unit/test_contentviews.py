"""The registry content views, on payloads recorded from the test registry
(tests/unit/payloads/, see its README), directly and through mitmproxy's own
``auto`` selection (``contentviews.prettify_message``, what mitmweb's
``/flows/<id>/<part>/content/auto.json`` calls)."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from mitmproxy import contentviews, http
from mitmproxy.contentviews import Metadata
from mitmproxy.test import taddons, tflow

from hubrewrite.debug import contentviews as registry_views
from hubrewrite.mitmseams.contentviews import remove_view
from hubrewrite.debug.fingerprint import fingerprint

PAYLOADS = Path(__file__).parent / "payloads"
RECORDED: dict[str, dict[str, Any]] = json.loads((PAYLOADS / "recorded.json").read_text())
ALICE_PASSWORD = "alice-test-password"  # the fake password record.py gave alice


@pytest.fixture(autouse=True)
def registered() -> Iterator[None]:
    registry_views.register()
    with taddons.context():  # make_metadata reads ctx.options
        yield
    registry_views.unregister()


def payload(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def doc(name: str) -> Any:
    return json.loads(payload(name))


def recorded_flow(name: str) -> http.HTTPFlow:
    """A flow as mitmproxy would hold it for the recorded exchange ``name``."""
    rec = RECORDED[name]
    flow = tflow.tflow(resp=True)
    flow.request.method, flow.request.path = rec["method"], rec["path"]
    flow.request.content = b""
    if "authorization" in rec:
        flow.request.headers["Authorization"] = rec["authorization"]
    if "request_body" in rec:
        flow.request.headers["Content-Type"] = "application/x-www-form-urlencoded"
        flow.request.content = payload(rec["request_body"])
    flow.response.status_code = rec["status"]
    flow.response.headers["Content-Type"] = rec["content_type"]
    for value in rec.get("www_authenticate", []):
        flow.response.headers.add("WWW-Authenticate", value)
    flow.response.content = payload(name)
    return flow


def auto(flow: http.HTTPFlow, part: str = "response") -> contentviews.ContentviewResult:
    return contentviews.prettify_message(getattr(flow, part), flow)


def response_flow(body: bytes, content_type: str | None, path: str = "/v2/library/alpine/manifests/3.19",
                  status: int = 200) -> http.HTTPFlow:
    flow = tflow.tflow(resp=True)
    flow.request.path = path
    flow.response.status_code = status
    if content_type:
        flow.response.headers["Content-Type"] = content_type
    flow.response.content = body
    return flow


def jwt_parts(token_answer: str) -> list[str]:
    return doc(token_answer)["token"].split(".")


# ---------------------------------------------------------------- manifests and indexes


@pytest.mark.parametrize("name", ["docker_list.json", "oci_index.json"])
def test_index_summary_names_each_platform_with_digest_and_size(name):
    result = auto(recorded_flow(name))
    assert result.view_name == "Registry manifest"
    assert result.syntax_highlight != "error"
    lines = result.text.splitlines()
    for entry in doc(name)["manifests"]:
        platform = entry["platform"]
        label = "/".join(filter(None, [platform["os"], platform["architecture"], platform.get("variant")]))
        [line] = [l for l in lines if entry["digest"] in l]
        assert line.split()[:3] == [label, str(entry["size"]), "B"]
    assert "linux/amd64" in result.text and "linux/arm64" in result.text
    assert doc(name)["mediaType"] in lines[0]


def test_index_attestations_are_shown_as_attestations_of_their_image():
    index = doc("oci_index_attestations.json")
    images = {e["digest"]: e for e in index["manifests"] if e["platform"]["os"] == "linux"}
    attestations = [e for e in index["manifests"] if e["platform"]["os"] == "unknown"]
    result = auto(recorded_flow("oci_index_attestations.json"))
    assert result.view_name == "Registry manifest"
    text = result.text
    platforms, attested = text.split("attestations (2):")
    assert "platforms (2):" in platforms and "unknown" not in text
    for a in attestations:
        target = a["annotations"]["vnd.docker.reference.digest"]
        assert target in images
        arch = images[target]["platform"]["architecture"]
        [line] = [l for l in attested.splitlines() if a["digest"] in l]
        assert line.split()[:2] == ["of", f"linux/{arch}" + ("/v8" if arch == "arm64" else "")]
        assert f"attests {target}" in attested


@pytest.mark.parametrize("name", ["docker_image.json", "oci_image.json", "oci_attestation_manifest.json"])
def test_image_summary_lists_config_each_layer_and_the_total(name):
    manifest = doc(name)
    result = auto(recorded_flow(name))
    assert result.view_name == "Registry manifest"
    lines = result.text.splitlines()
    for d in [manifest["config"], *manifest["layers"]]:
        [line] = [l for l in lines if d["digest"] in l]
        assert f"{d['size']} B" in line and d["mediaType"] in line
    total = manifest["config"]["size"] + sum(l["size"] for l in manifest["layers"])
    assert any(l.startswith("total (config and ") and f"): {total} B" in l for l in lines)


def test_layer_annotations_of_an_attestation_manifest():
    text = auto(recorded_flow("oci_attestation_manifest.json")).text
    assert "in-toto.io/predicate-type: https://slsa.dev/provenance/v0.2" in text


def test_referrer_shows_artifact_type_subject_and_annotations():
    manifest = doc("oci_referrer.json")
    text = auto(recorded_flow("oci_referrer.json")).text
    assert "artifact type: application/spdx+json" in text
    [subject_line] = [l for l in text.splitlines() if l.startswith("subject")]
    assert manifest["subject"]["digest"] in subject_line and f"{manifest['subject']['size']} B" in subject_line
    assert "org.opencontainers.image.created: 2024-01-01T00:00:00Z" in text


def test_schema1_signed_manifest():
    manifest = doc("schema1_signed.json")
    result = auto(recorded_flow("schema1_signed.json"))
    assert result.view_name == "Registry manifest"
    text = result.text
    assert text.startswith("Docker schema 1 manifest, signed")
    for line in ["name: library/alpine", "tag: 3.19", "architecture: amd64", "fsLayers (2, newest first):",
                 "signatures: 1 (ES256), not verified here"]:
        assert line in text.splitlines()
    for layer in manifest["fsLayers"]:
        assert f"  {layer['blobSum']}" in text.splitlines()


def test_generic_content_type_on_a_manifest_path_uses_the_body_media_type():
    result = auto(response_flow(payload("docker_list.json"), "application/json"))
    assert result.view_name == "Registry manifest"
    assert result.text.startswith("Docker manifest list")


def test_oci_index_without_media_type_is_recognised_by_shape():
    index = doc("oci_index.json")
    del index["mediaType"]
    result = auto(response_flow(json.dumps(index).encode(), "application/octet-stream"))
    assert result.view_name == "Registry manifest"
    assert result.text.startswith("OCI image index") and "linux/arm64/v8" in result.text


def test_content_type_and_body_media_type_disagreeing_is_pointed_out():
    body = payload("oci_index.json")
    text = auto(response_flow(body, "application/vnd.docker.distribution.manifest.list.v2+json")).text
    assert text.startswith("Docker manifest list")
    assert "! the body says mediaType application/vnd.oci.image.index.v1+json" in text


def test_a_pushed_manifest_in_a_request_is_summarised_too():
    flow = tflow.tflow()
    flow.request.method, flow.request.path = "PUT", "/v2/team/ociapp/manifests/1.0"
    flow.request.headers["Content-Type"] = "application/vnd.oci.image.manifest.v1+json"
    flow.request.content = payload("oci_image.json")
    result = auto(flow, "request")
    assert result.view_name == "Registry manifest" and "layers (2):" in result.text


# ---------------------------------------------------------------- token answers


@pytest.mark.parametrize("name", ["token_answer_get.json", "token_answer_post.json"])
def test_token_answer_shows_claims_and_access_but_never_the_token(name):
    answer = doc(name)
    header_b64, claims_b64, signature = jwt_parts(name)
    result = auto(recorded_flow(name))
    assert result.view_name == "Registry token"
    text = result.text
    assert signature not in text
    assert answer["token"] not in text and claims_b64 not in text
    assert answer["refresh_token"] not in text
    claims = json.loads(base64.urlsafe_b64decode(claims_b64 + "==="))
    for entry in claims["access"]:
        assert f"    {entry['type']}:{entry['name']}:{','.join(entry['actions'])}" in text.splitlines()
    assert "subject (sub): alice" in text
    assert "alg: RS256" in text and "x5c: 1 certificate(s), not shown" in text
    assert "expires in 300 s" in text
    assert " UTC (" in text  # dates, with the number they came from


def test_token_fingerprint_matches_the_bearer_header_that_carries_it():
    """What lets someone follow a token from its answer to the requests using it."""
    token = doc("token_answer_get.json")["token"]
    text = auto(recorded_flow("token_answer_get.json")).text
    digits = fingerprint(f"Bearer {token}").split()[-1]
    assert f"token: JWT {digits}" in text


def test_anonymous_token_answer_with_nothing_granted():
    text = auto(recorded_flow("token_answer_anonymous.json")).text
    assert 'subject (sub): "" (anonymous)' in text
    assert "    repository:private/secret:  (nothing granted)" in text.splitlines()


def test_opaque_token_and_unknown_fields_appear_only_as_fingerprints():
    secret, other = "opaque-0123456789abcdef", "an-id-token-value"
    body = json.dumps({"access_token": secret, "expires_in": 60, "id_token": other, "token_type": "Bearer"})
    result = auto(response_flow(body.encode(), "application/json", path="/oauth2/token"))
    assert result.view_name == "Registry token"
    assert secret not in result.text and other not in result.text
    assert "access_token: opaque <hmac:" in result.text
    assert "id_token: <hmac:" in result.text and "token_type: Bearer" in result.text


# ---------------------------------------------------------------- challenges


def test_challenge_fields_and_registry_errors():
    result = auto(recorded_flow("challenge_insufficient_scope.json"))
    assert result.view_name == "Registry challenge"
    lines = result.text.splitlines()
    realm = RECORDED["challenge_insufficient_scope.json"]["www_authenticate"][0].split('"')[1]
    for line in ["challenge: Bearer", f"  realm: {realm}", "  service: registry.docker.io", "  scope (1):",
                 "    repository:private/secret:pull", "  error: insufficient_scope",
                 "  UNAUTHORIZED: authentication required"]:
        assert line in lines


def test_challenge_on_a_bodiless_401_with_several_scopes():
    flow = response_flow(b"", None, status=401)
    flow.response.headers["WWW-Authenticate"] = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/a:pull repository:library/b:pull,push"')
    result = auto(flow)
    assert result.view_name == "Registry challenge"
    assert "  scope (2):" in result.text.splitlines()
    assert "    repository:library/b:pull,push" in result.text.splitlines()


# ---------------------------------------------------------------- token requests


def test_token_request_get_splits_scopes_and_fingerprints_basic_credentials():
    flow = recorded_flow("token_answer_get.json")
    result = auto(flow, "request")
    assert result.view_name == "Registry token request"
    lines = result.text.splitlines()
    assert "scope (3):" in lines
    for scope in ["repository:library/alpine:pull", "repository:library/busybox:pull",
                  "repository:private/secret:pull"]:
        assert f"  {scope}" in lines
    for line in ["service: registry.docker.io", "account: alice", "client_id: docker", "offline_token: true"]:
        assert line in lines
    assert any(l.startswith("credentials: Basic user=alice <hmac:") for l in lines)
    basic = flow.request.headers["Authorization"].split()[1]
    assert ALICE_PASSWORD not in result.text and basic not in result.text


def test_token_request_post_form_never_shows_the_password():
    result = auto(recorded_flow("token_answer_post.json"), "request")
    assert result.view_name == "Registry token request"
    lines = result.text.splitlines()
    for line in ["grant_type: password", "username: alice", "client_id: containerd", "access_type: offline",
                 "scope (2):", "  repository:team/ociapp:pull"]:
        assert line in lines
    assert any(l.startswith("password: <hmac:") for l in lines)
    assert ALICE_PASSWORD not in result.text


def test_refresh_token_grant_fingerprints_the_refresh_token():
    refresh = doc("token_answer_post.json")["refresh_token"]
    flow = tflow.tflow()
    flow.request.method, flow.request.path = "POST", "/token/ghcr.io"
    flow.request.headers["Content-Type"] = "application/x-www-form-urlencoded"
    flow.request.content = f"grant_type=refresh_token&refresh_token={refresh}&service=ghcr.io".encode()
    result = auto(flow, "request")
    assert result.view_name == "Registry token request"
    assert refresh not in result.text and "refresh_token: <hmac:" in result.text


# ---------------------------------------------------------------- fallbacks


def test_truncated_manifest_falls_back_without_error():
    """JSON cannot parse it either, so mitmproxy ends at Raw, as for any broken JSON body."""
    body = payload("oci_index.json")[:100]
    result = auto(response_flow(body, "application/vnd.oci.image.index.v1+json"))
    assert result.view_name == "Raw"
    assert result.syntax_highlight != "error" and result.text == body.decode()


@pytest.mark.parametrize("body", [
    b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": "none"}',
    b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}',
    b'[1, 2, 3]',
])
def test_valid_json_of_another_shape_is_shown_as_json(body):
    result = auto(response_flow(body, "application/vnd.oci.image.index.v1+json"))
    assert result.view_name == "JSON"
    assert json.loads(result.text) == json.loads(body)


def test_unparseable_challenge_is_left_to_the_usual_views():
    flow = response_flow(b'{"errors": []}', "application/json", status=401)
    flow.response.headers["WWW-Authenticate"] = 'Bearer realm="unterminated'
    assert auto(flow).view_name == "JSON"


@pytest.mark.parametrize("body,content_type", [
    (b'{"token": 5}', "application/json"),
    (b'{"name": "library/alpine", "tags": ["3.19"]}', "application/json"),
    (b"\x1f\x8b\x08\x00" + bytes(64), "application/octet-stream"),
])
def test_other_answers_are_not_claimed(body, content_type):
    result = auto(response_flow(body, content_type, path="/v2/library/alpine/tags/list"))
    assert not result.view_name.startswith("Registry")


def test_a_view_picked_by_hand_on_a_foreign_body_says_so_instead_of_failing():
    flow = response_flow(b'{"hello": "world"}', "application/json")
    for view in registry_views.VIEWS:
        result = contentviews.prettify_message(flow.response, flow, view_name=view.name)
        assert result.view_name == view.name and result.syntax_highlight != "error"
        assert result.text.startswith("This is not ")


def _mutations(value: Any) -> Iterator[Any]:
    """Copies of ``value`` with one subtree at a time replaced by something of the wrong type."""
    odd = [None, True, 1.5, -1, 10**400, float("inf"), float("nan"), "", "line\nbreak", [], {}, [[1]], {"x": {}}]
    yield from odd
    if isinstance(value, dict):
        for key in value:
            for changed in _mutations(value[key]):
                copy_ = copy.copy(value)
                copy_[key] = changed
                yield copy_
    elif isinstance(value, list):
        for i, item in enumerate(value):
            for changed in _mutations(item):
                yield value[:i] + [changed] + value[i + 1:]


def _bodies(name: str) -> Iterator[Any]:
    """Mutations of a recorded payload and, for a token answer, of its JWT's header and claims."""
    original = doc(name)
    yield from _mutations(original)
    if name.startswith("token_answer"):
        header, claims = (_b64json(p) for p in original["token"].split(".")[:2])
        signature = "c2lnbmF0dXJl"
        for h, c in [*((m, claims) for m in _mutations(header)), *((header, m) for m in _mutations(claims))]:
            yield dict(original, token=f"{_b64(h)}.{_b64(c)}.{signature}")


def _b64json(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def _b64(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize("name", [n for n in RECORDED if n.endswith(".json")])
def test_no_view_raises_on_any_mutation_of_a_recorded_payload(name):
    """mitmproxy logs a traceback for a view that raises in render_priority; ours never do."""
    flow = recorded_flow(name)
    request_metadata = Metadata(flow=flow, http_message=flow.request, content_type=None)
    count = 0
    for mutated in _bodies(name):
        body = json.dumps(mutated).encode()
        for content_type in (RECORDED[name]["content_type"].split(";")[0], None):
            metadata = Metadata(flow=flow, http_message=flow.response, content_type=content_type)
            for view in registry_views.VIEWS:
                assert view.render_priority(body, metadata) in (registry_views.SUMMARY_PRIORITY,
                                                                registry_views.NOT_MINE)
                assert isinstance(view.prettify(body, metadata), str)
                view.render_priority(body, request_metadata)
        count += 1
    assert count > 40


# ---------------------------------------------------------------- registration


def test_register_twice_keeps_one_view_per_name_and_unregister_removes_them():
    registry_views.register()
    names = contentviews.registry.available_views()
    for view in registry_views.VIEWS:
        assert names.count(view.name.lower()) == 1
    registry_views.unregister()
    assert not any(v.startswith("registry") for v in contentviews.registry.available_views())


def test_unregister_leaves_a_view_that_replaced_ours():
    replacement = registry_views.ManifestView()
    contentviews.add(replacement)
    registry_views.unregister()
    assert contentviews.registry["registry manifest"] is replacement
    remove_view(replacement)

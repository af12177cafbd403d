"""Record the payloads in this directory from the test registry.

Run from the repository root:  .venv/bin/python tests/unit/payloads/record.py

Starts ``tests.support.upstream.Upstream`` in a temporary directory, pushes the
standard images plus ``library/attested:1.0`` (an OCI index with buildkit-style
attestation manifests) and an OCI 1.1 referrer of ``team/ociapp:1.0``, then
saves what the edge and the token server answer, and writes ``recorded.json``
(per file: method, path, status, Content-Type, the request's headers of note).
The schema 1 manifest is the only one written here rather than fetched:
distribution 2.8 no longer accepts or serves schema 1, so it is built by hand
after the v2.1 spec and signed the way libtrust did (ES256 JWS over the
manifest without its ``signatures``, ``formatLength``/``formatTail`` in the
protected header).
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from tests.support.images import (ALL_MANIFEST_TYPES, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST,  # noqa: E402
                                  Pusher, canonical_json, push_image, sha256_digest, standard_images)
from tests.support.upstream import Upstream  # noqa: E402

# an obviously fake password, so the recorded token request can be kept in the repository
ALICE_PASSWORD = "alice-test-password"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
IN_TOTO = "application/vnd.in-toto+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

recorded: dict[str, dict[str, Any]] = {}


def save(name: str, r: httpx.Response, **request_notes: Any) -> None:
    (HERE / name).write_bytes(r.content)
    u = urlsplit(str(r.request.url))
    recorded[name] = {"method": r.request.method, "path": u.path + (f"?{u.query}" if u.query else ""),
                      "status": r.status_code, "content_type": r.headers.get("content-type"),
                      **({"www_authenticate": r.headers.get_list("www-authenticate")}
                         if "www-authenticate" in r.headers else {}),
                      **request_notes}


def push_attested(up: Upstream, p: Pusher) -> None:
    """library/attested:1.0, shaped like a ``docker buildx build --provenance`` result."""
    images = [push_image(up, "library/attested", None, [{"app.txt": f"attested {arch}\n"}], media="oci",
                         arch=arch, pusher=p) for arch in ("amd64", "arm64")]
    entries = [{"mediaType": OCI_MANIFEST, "digest": i["digest"], "size": i["size"],
                "platform": {"architecture": i["arch"], "os": "linux",
                             **({"variant": "v8"} if i["arch"] == "arm64" else {})}} for i in images]
    for image in images:
        statement = canonical_json({
            "_type": "https://in-toto.io/Statement/v0.1", "predicateType": "https://slsa.dev/provenance/v0.2",
            "subject": [{"name": f"pkg:docker/library/attested@1.0?platform=linux%2F{image['arch']}",
                         "digest": {"sha256": image["digest"].split(":", 1)[1]}}],
            "predicate": {"builder": {"id": ""}, "buildType": "https://mobyproject.org/buildkit@v1"}})
        config = canonical_json({"architecture": "unknown", "os": "unknown", "config": {},
                                 "rootfs": {"type": "layers", "diff_ids": [sha256_digest(statement)]}})
        manifest = canonical_json({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": p.push_blob("library/attested", config),
                       "size": len(config)},
            "layers": [{"mediaType": IN_TOTO, "digest": p.push_blob("library/attested", statement),
                        "size": len(statement),
                        "annotations": {"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"}}]})
        digest = p.push_manifest("library/attested", sha256_digest(manifest), manifest, OCI_MANIFEST)
        entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest),
                        "annotations": {"vnd.docker.reference.digest": image["digest"],
                                        "vnd.docker.reference.type": "attestation-manifest"},
                        "platform": {"architecture": "unknown", "os": "unknown"}})
    index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    p.push_manifest("library/attested", "1.0", index, OCI_INDEX)


def push_referrer(p: Pusher, subject: dict[str, Any]) -> str:
    """An SBOM artifact that names team/ociapp:1.0 as its ``subject`` (OCI 1.1 referrers)."""
    sbom = canonical_json({"spdxVersion": "SPDX-2.3", "name": "team/ociapp", "packages": []})
    empty = b"{}"
    manifest = canonical_json({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/spdx+json",
        "config": {"mediaType": OCI_EMPTY, "digest": p.push_blob("team/ociapp", empty), "size": len(empty),
                   "data": base64.b64encode(empty).decode()},
        "layers": [{"mediaType": "application/spdx+json", "digest": p.push_blob("team/ociapp", sbom),
                    "size": len(sbom)}],
        "subject": {"mediaType": subject["media_type"], "digest": subject["digest"], "size": subject["size"]},
        "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"}})
    return p.push_manifest("team/ociapp", sha256_digest(manifest), manifest, OCI_MANIFEST)


def schema1_signed(layers: list[str]) -> bytes:
    def b64url(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    history = [{"v1Compatibility": json.dumps({"id": hashlib.sha256(d.encode()).hexdigest(),
                                                "created": "2024-01-01T00:00:00Z"})} for d in layers]
    payload = json.dumps({"schemaVersion": 1, "name": "library/alpine", "tag": "3.19", "architecture": "amd64",
                          "fsLayers": [{"blobSum": d} for d in layers], "history": history}, indent=3).encode()
    body, tail = payload[:-2], payload[-2:]  # libtrust splits off the closing "\n}"
    key = ec.generate_private_key(ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    kid = ":".join(b32[i:i + 4] for i in range(0, 48, 4))
    protected = b64url(json.dumps({"formatLength": len(body), "formatTail": b64url(tail),
                                   "time": "2024-01-01T00:00:00Z"}).encode())
    r, s = decode_dss_signature(key.sign(f"{protected}.{b64url(payload)}".encode(), ec.ECDSA(hashes.SHA256())))
    signature = {"header": {"jwk": {"crv": "P-256", "kid": kid, "kty": "EC",
                                    "x": b64url(numbers.x.to_bytes(32, "big")),
                                    "y": b64url(numbers.y.to_bytes(32, "big"))}, "alg": "ES256"},
                 "signature": b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big")), "protected": protected}
    signatures = json.dumps([signature], indent=3).replace("\n", "\n   ").encode()
    return body + b',\n   "signatures": ' + signatures + tail


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, \
            Upstream(Path(tmp), users={"alice": ALICE_PASSWORD}) as up, httpx.Client(timeout=30) as client:
        images = standard_images(up, big_size=4096)
        with Pusher(up) as p:
            push_attested(up, p)
            referrer = push_referrer(p, images["team/ociapp"])
        api, realm, service = up.api_url, up.token_realm, up.service

        save("challenge_401.json", client.get(f"{api}/v2/library/alpine/manifests/3.19",
                                              headers={"Accept": ", ".join(ALL_MANIFEST_TYPES)}))
        anonymous = up.get_token("repository:private/secret:pull")
        save("challenge_insufficient_scope.json", client.get(
            f"{api}/v2/private/secret/manifests/1.0",
            headers={"Accept": ", ".join(ALL_MANIFEST_TYPES), "Authorization": f"Bearer {anonymous}"}))
        query = urlencode([("service", service), ("scope", "repository:library/alpine:pull"),
                           ("scope", "repository:library/busybox:pull repository:private/secret:pull"),
                           ("account", "alice"), ("client_id", "docker"), ("offline_token", "true")])
        save("token_answer_get.json", client.get(f"{realm}?{query}", auth=("alice", ALICE_PASSWORD)),
             authorization=up.basic_auth_header("alice"))
        save("token_answer_anonymous.json", client.get(realm, params=[
            ("service", service), ("scope", "repository:private/secret:pull")]))
        form = urlencode({"grant_type": "password", "username": "alice", "password": ALICE_PASSWORD,
                          "client_id": "containerd", "access_type": "offline", "service": service,
                          "scope": "repository:library/alpine:pull repository:team/ociapp:pull"})
        (HERE / "token_request_post.form").write_text(form)
        save("token_answer_post.json", client.post(realm, content=form, headers={
            "Content-Type": "application/x-www-form-urlencoded"}), request_body="token_request_post.form")

        repos = ["library/alpine", "library/busybox", "library/attested", "team/ociapp"]
        token = up.get_token([f"repository:{r}:pull" for r in repos], user="alice")
        accept = {"Accept": ", ".join(ALL_MANIFEST_TYPES), "Authorization": f"Bearer {token}"}
        attested = client.get(f"{api}/v2/library/attested/manifests/1.0", headers=accept).json()
        for name, repo, ref in [
            ("docker_list.json", "library/alpine", "3.19"),
            ("docker_image.json", "library/alpine", images["library/alpine"]["manifests"]["amd64"]["digest"]),
            ("oci_index.json", "library/busybox", "latest"),
            ("oci_image.json", "team/ociapp", "1.0"),
            ("oci_index_attestations.json", "library/attested", "1.0"),
            ("oci_attestation_manifest.json", "library/attested", attested["manifests"][2]["digest"]),
            ("oci_referrer.json", "team/ociapp", referrer),
        ]:
            r = client.get(f"{api}/v2/{repo}/manifests/{ref}", headers=accept)
            r.raise_for_status()
            save(name, r)
        (HERE / "schema1_signed.json").write_bytes(
            schema1_signed(images["library/alpine"]["manifests"]["amd64"]["layer_digests"][::-1]))
        recorded["schema1_signed.json"] = {"method": "GET", "path": "/v2/library/alpine/manifests/3.19",
                                           "status": 200, "content_type": SCHEMA1, "written_by_hand": True}
    (HERE / "recorded.json").write_text(json.dumps(recorded, indent=2) + "\n")


if __name__ == "__main__":
    main()

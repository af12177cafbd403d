"""Stale mode (issue 9, items 7 and 8): with the upstream down, cached content is
served only where the upstream itself would have served it.

Item 7, Accept: a tag cached for a client accepting single-image manifests only
(distribution then converts the index to its amd64 manifest) is not served to a
client accepting indexes (the registry's error instead); a client naming the
same manifest types in another order and spacing gets it stale, one adding
parameters does not (a registry may read them).  Likewise an index cached for
one index-accepting client is served stale to another.

Issue 17, item 8, letter case: distribution matches Accept types
case-sensitively, so an anonymous request naming the index types in upper case
gets a tag's amd64 manifest, and one naming only the schema2 type in upper case
gets schema1.  Neither answer may stand in, with the upstream down, for what
docker, containerd and schema2-only clients asked for in lower case; nor may an
index answer go to a client that refused index types with ``q=0``.

Item 8, token expiry: against an upstream whose tokens live a few seconds, a
private image cached through alice is served stale while her token is valid;
once it expired nothing private is served (public content cached anonymously
still is), unless ``hub_cache_stale_grace`` covers the expiry.
"""

from __future__ import annotations

import secrets
import time

import httpx
import pytest

from tests.conftest import running_upstream
from tests.support.images import (DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Pusher, push_image, push_index,
                                  sha256_digest)
from tests.support.mirror import Mirror
from tests.support.token_server import decode_jwt_unverified

from .helpers import INDEX_ACCEPT, SERVICE, UPSTREAM_TIMEOUT, anonymous_token, assert_registry_error

DOWN_STATUSES = (401, 502, 503, 504)
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"


def fresh_index(upstream, repo: str) -> dict:
    """A Docker manifest list (amd64 + arm64, never-seen layers) at ``repo:1``."""
    seed = secrets.token_hex(8)
    with Pusher(upstream) as p:
        images = [push_image(upstream, repo, None, [{"arch.txt": f"{arch} {seed}\n"}], arch=arch, pusher=p)
                  for arch in ("amd64", "arm64")]
        return push_index(upstream, repo, "1", images, pusher=p)


def manifest(mirror, repo: str, ref: str, token: str | None, accept: list[str]) -> httpx.Response:
    headers = [("Authorization", f"Bearer {token}")] if token else []
    return httpx.get(f"{mirror.url}/v2/{repo}/manifests/{ref}", timeout=20,
                     headers=headers + [("Accept", a) for a in accept])


def blob(mirror, repo: str, digest: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{mirror.url}/v2/{repo}/blobs/{digest}", headers=headers, timeout=20, follow_redirects=True)


def assert_stale(r: httpx.Response, digest: str, what: str) -> None:
    assert r.status_code == 200, f"{what}: {r.status_code} {r.text[:300]}"
    assert r.headers.get("x-hub-cache") == "stale", f"{what}: X-Hub-Cache {r.headers.get('x-hub-cache')}"
    assert r.headers.get("docker-content-digest") == digest and sha256_digest(r.content) == digest, what


def assert_refused(r: httpx.Response, secret: bytes, what: str) -> None:
    """A registry error, and not one byte of the content."""
    assert_registry_error(r, DOWN_STATUSES, what)
    assert secret not in r.content, f"{what}: content in the error answer"


# ---------------------------------------------------------------- item 7: Accept

SINGLE_IMAGE = [OCI_MANIFEST, DOCKER_MANIFEST]


def test_single_image_answer_is_not_served_stale_to_an_index_accepting_client(mirror, upstream):
    index = fresh_index(upstream, "team/stale-narrow")
    amd64 = index["manifests"]["amd64"]
    token = anonymous_token(mirror.url, "team/stale-narrow")
    r = manifest(mirror, "team/stale-narrow", "1", token, [", ".join(SINGLE_IMAGE)])
    assert r.status_code == 200 and r.headers.get("docker-content-digest") == amd64["digest"], \
        f"distribution converts the list for a client without index types: {r.status_code} {r.headers}"
    assert r.headers.get("content-type") == DOCKER_MANIFEST

    with upstream.service_stopped("registry"):
        r = manifest(mirror, "team/stale-narrow", "1", token, INDEX_ACCEPT)
        assert r.headers.get("docker-content-digest") != amd64["digest"], \
            "an index-accepting client got the amd64 manifest cached for a narrower Accept"
        assert_refused(r, amd64["manifest_bytes"], "index Accept, only a single-image answer cached")
        # the same types, in another order and spacing: the same answer, stale
        r = manifest(mirror, "team/stale-narrow", "1", token, [f"{DOCKER_MANIFEST} ,  {OCI_MANIFEST}"])
        assert_stale(r, amd64["digest"], "the same single-image types spelled differently")
        assert r.headers.get("content-type") == DOCKER_MANIFEST
        # with parameters it is another Accept: what decided the answer is not known for it
        r = manifest(mirror, "team/stale-narrow", "1", token, [f"{DOCKER_MANIFEST};q=0.8, {OCI_MANIFEST};q=0.9"])
        assert_refused(r, amd64["manifest_bytes"], "the single-image types with q-params")


def test_index_answer_is_served_stale_to_an_index_accepting_client_spelled_differently(mirror, upstream):
    index = fresh_index(upstream, "team/stale-wide")
    token = anonymous_token(mirror.url, "team/stale-wide")
    r = manifest(mirror, "team/stale-wide", "1", token, INDEX_ACCEPT)
    assert r.status_code == 200 and r.headers.get("docker-content-digest") == index["digest"], r.text[:300]
    assert r.headers.get("content-type") == DOCKER_LIST

    with upstream.service_stopped("registry"):
        spelled = f"{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.5, {DOCKER_LIST};q=0.9, {OCI_INDEX}"
        r = manifest(mirror, "team/stale-wide", "1", token, [spelled])
        assert_stale(r, index["digest"], "index types in one header, another order, q-params")
        assert r.headers.get("content-type") == DOCKER_LIST


# ---------------------------------------------------------------- issue 17, item 8: letter case

SHOUTED_INDEXES = [DOCKER_LIST.upper(), OCI_INDEX.upper(), DOCKER_MANIFEST, OCI_MANIFEST]


def test_accept_in_upper_case_cannot_poison_the_stale_answers_of_other_clients(mirror, upstream):
    repo = "team/stale-case"
    index = fresh_index(upstream, repo)
    amd64 = index["manifests"]["amd64"]
    token = anonymous_token(mirror.url, repo)
    r = manifest(mirror, repo, "1", token, INDEX_ACCEPT)  # docker, containerd
    assert r.status_code == 200 and r.headers.get("docker-content-digest") == index["digest"], r.text[:300]
    r = manifest(mirror, repo, "1", token, [DOCKER_MANIFEST])  # a schema2-only client
    assert r.status_code == 200 and r.headers.get("docker-content-digest") == amd64["digest"], r.text[:300]

    r = manifest(mirror, repo, "1", token, [f"{DOCKER_LIST};q=0", f"{OCI_INDEX};q=0", DOCKER_MANIFEST])
    assert r.status_code == 200, r.text[:300]  # distribution ignores q: the list
    # then anonymous requests the upstream reads without the types they name in upper case
    r = manifest(mirror, repo, "1", token, SHOUTED_INDEXES)
    assert r.status_code == 200 and r.headers.get("docker-content-digest") == amd64["digest"], \
        f"the upstream matches Accept case-sensitively: {r.status_code} {r.headers}"
    r = manifest(mirror, repo, "1", token, [DOCKER_MANIFEST.upper()])
    assert r.status_code == 200 and r.headers.get("content-type") == SCHEMA1, r.headers

    with upstream.service_stopped("registry"):
        r = manifest(mirror, repo, "1", token, INDEX_ACCEPT)
        assert_stale(r, index["digest"], "docker and containerd after an upper-case Accept")
        assert r.headers.get("content-type") == DOCKER_LIST
        r = manifest(mirror, repo, "1", token, [DOCKER_MANIFEST])
        assert_stale(r, amd64["digest"], "a schema2-only client after a schema1 answer in upper case")
        r = manifest(mirror, repo, "1", token, SHOUTED_INDEXES)  # its own answer, as the upstream gave it
        assert_stale(r, amd64["digest"], "the upper-case Accept itself")
        # index types refused with q=0: never the index
        r = manifest(mirror, repo, "1", token, [f"{DOCKER_LIST};q=0", f"{OCI_INDEX};q=0", DOCKER_MANIFEST])
        assert r.headers.get("docker-content-digest") != index["digest"], "index served to a client refusing it"


# ---------------------------------------------------------------- item 8: expiring tokens

TOKEN_LIFETIME = 6  # seconds the short-lived upstream's tokens are valid


def short_token_images(up) -> dict:
    """A private image (alice only) and a public one, never seen by anyone."""
    seed = secrets.token_hex(8)
    with Pusher(up) as p:
        return {repo: push_image(up, repo, "1", [{"data.txt": f"{repo} {seed}\n"}], pusher=p)
                for repo in ("private/stale", "team/stale-public")}


@pytest.fixture(scope="module")
def short_upstream(tmp_path_factory):
    """An upstream of its own whose token server issues tokens valid for TOKEN_LIFETIME seconds."""
    yield from running_upstream(tmp_path_factory.mktemp("short-token-upstream"), short_token_images,
                                token_expires_in=TOKEN_LIFETIME)


def mirror_token(mirror, repo: str, user: tuple[str, str] | None) -> tuple[str, float]:
    """A token through the mirror's /token, and when it expires."""
    r = httpx.get(f"{mirror.url}/token", params={"service": SERVICE, "scope": f"repository:{repo}:pull"},
                  auth=user, timeout=10)
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    return token, float(decode_jwt_unverified(token)[1]["exp"])


def cache_both(mirror, up) -> dict:
    """Pull the private image through alice and the public one anonymously (manifest by tag
    and every blob); then take the upstream down.  The tokens, with their expiry."""
    private, public = up.images["private/stale"], up.images["team/stale-public"]
    alice, alice_exp = mirror_token(mirror, "private/stale", ("alice", up.users["alice"]))
    anonymous, _ = mirror_token(mirror, "team/stale-public", None)
    for repo, image, token in (("private/stale", private, alice), ("team/stale-public", public, anonymous)):
        r = manifest(mirror, repo, "1", token, INDEX_ACCEPT)
        assert r.status_code == 200 and r.headers.get("docker-content-digest") == image["digest"], r.text[:300]
        for digest in (image["config_digest"], *image["layer_digests"]):
            r = blob(mirror, repo, digest, token)
            assert r.status_code == 200 and sha256_digest(r.content) == digest, f"{repo} {digest}: {r.status_code}"
    up.stop_service("edge")
    return {"alice": alice, "alice_exp": alice_exp, "anonymous": anonymous}


def serves_private_stale(mirror, up, token: str) -> None:
    private = up.images["private/stale"]
    assert_stale(manifest(mirror, "private/stale", "1", token, INDEX_ACCEPT), private["digest"], "private manifest")
    r = blob(mirror, "private/stale", private["layer_digests"][0], token)
    assert r.status_code == 200 and sha256_digest(r.content) == private["layer_digests"][0], \
        f"private blob: {r.status_code} {r.text[:200]}"


def wait_past(exp: float) -> None:
    time.sleep(max(0.0, exp + 1.0 - time.time()))


@pytest.fixture
def stale_mirror(short_upstream, tmp_path, request):
    """A mirror with a cache in front of the short-token upstream (``hub_cache_stale_grace``
    from the test's parameter); the upstream is brought back afterwards."""
    options = {"hub_cache_dir": str(tmp_path / "cache"), "hub_upstream_timeout": str(UPSTREAM_TIMEOUT),
               **getattr(request, "param", {})}
    try:
        with Mirror(tmp_path / "mirror", short_upstream, options=options) as m:
            yield m
            assert "Traceback" not in m.log_text()
    finally:
        short_upstream.start_service("edge")


def test_expired_token_opens_nothing_private_in_stale_mode(stale_mirror, short_upstream):
    up, private, public = short_upstream, short_upstream.images["private/stale"], short_upstream.images["team/stale-public"]
    tokens = cache_both(stale_mirror, up)
    assert time.time() < tokens["alice_exp"] - 1, "too slow: alice's token expired before the first check"
    serves_private_stale(stale_mirror, up, tokens["alice"])

    wait_past(tokens["alice_exp"])
    secret = private["manifest_bytes"]
    for ref in ("1", private["digest"]):
        assert_refused(manifest(stale_mirror, "private/stale", ref, tokens["alice"], INDEX_ACCEPT), secret,
                       f"private manifest {ref} with an expired token")
    for digest in (private["config_digest"], *private["layer_digests"]):
        r = blob(stale_mirror, "private/stale", digest, tokens["alice"])
        assert_refused(r, private["config_bytes"], f"private blob {digest} with an expired token")
    assert_refused(manifest(stale_mirror, "private/stale", "1", None, INDEX_ACCEPT), secret, "private, no token")
    # public content cached anonymously: still there, for the expired anonymous token and for no token
    for token in (tokens["anonymous"], None):
        assert_stale(manifest(stale_mirror, "team/stale-public", "1", token, INDEX_ACCEPT), public["digest"],
                     "public manifest after the tokens expired")
        r = blob(stale_mirror, "team/stale-public", public["layer_digests"][0], token)
        assert r.status_code == 200 and sha256_digest(r.content) == public["layer_digests"][0], r.text[:200]


@pytest.mark.parametrize("stale_mirror", [{"hub_cache_stale_grace": "60"}], indirect=True)
def test_stale_grace_lets_an_expired_token_in(stale_mirror, short_upstream):
    tokens = cache_both(stale_mirror, short_upstream)
    wait_past(tokens["alice_exp"])
    serves_private_stale(stale_mirror, short_upstream, tokens["alice"])

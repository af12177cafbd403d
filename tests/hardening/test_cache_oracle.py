"""Issue 9, item 10: no cache-presence oracle.

alice pulls a blob of a private repository through the mirror, so it is in the
cache. An anonymous client then asks for that digest through a public
repository, through the private repository, and through a repository that does
not exist, with and without tokens, by GET, HEAD and Range; and the same for a
digest nobody ever pulled. Status and registry error code must not depend on
whether the digest is cached, and must be what the upstream itself answers for
the uncached digest: otherwise the answer tells that someone pulled it.
"""

from __future__ import annotations

import hashlib
import secrets

import httpx
import pytest

from .helpers import SERVICE, anonymous_token, cache_blob_path, fresh_image, wait_until

# headers that differ between any two answers, whatever they are about
VOLATILE = {"date", "content-length", "content-type", "connection", "keep-alive"}


@pytest.fixture(scope="module")
def cached_private(mirror, upstream, cache_dir, tmp_path_factory) -> dict:
    """A private repository whose layer alice pulled through the mirror: now cached."""
    repo = f"private/h9-oracle-{secrets.token_hex(3)}"
    image = fresh_image(upstream, tmp_path_factory.mktemp("oracle-image"), repo)
    digest = image["layer_digests"][0]
    r = httpx.get(f"{mirror.url}/token", params={"service": SERVICE, "scope": f"repository:{repo}:pull"},
                  auth=("alice", upstream.users["alice"]), timeout=15)
    assert r.status_code == 200, r.text
    pulled = httpx.get(f"{mirror.url}/v2/{repo}/blobs/{digest}", headers={"Authorization": f"Bearer {r.json()['token']}"},
                       follow_redirects=True, timeout=30)
    assert pulled.status_code == 200 and hashlib.sha256(pulled.content).hexdigest() == digest.split(":", 1)[1]
    assert wait_until(lambda: cache_blob_path(cache_dir, digest).exists(), 10), "alice's pull did not cache the blob"
    return {"repo": repo, "digest": digest}


def answer(r: httpx.Response) -> tuple:
    """What a client can tell from an answer: status, error code, which headers it has."""
    try:
        code = r.json()["errors"][0]["code"]
    except Exception:
        code = None
    return r.status_code, code, sorted(k.lower() for k in r.headers if k.lower() not in VOLATILE)


def ask(base: str, method: str, repo: str, digest: str, token: str | None, ranged: bool) -> tuple:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if ranged:
        headers["Range"] = "bytes=0-9"
    return answer(httpx.request(method, f"{base}/v2/{repo}/blobs/{digest}", headers=headers, timeout=15))


@pytest.mark.parametrize("ranged", [False, True], ids=["whole", "range"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("through", ["public repository", "the private repository", "a repository that does not exist"])
@pytest.mark.parametrize("with_token", [True, False], ids=["anonymous token", "no token"])
def test_cached_and_uncached_digests_get_the_same_answer(mirror, upstream, cached_private, through, method, ranged,
                                                         with_token):
    repo = {"public repository": "library/alpine", "the private repository": cached_private["repo"],
            "a repository that does not exist": f"team/h9-none-{secrets.token_hex(3)}"}[through]
    token = anonymous_token(mirror.url, repo) if with_token else None
    uncached = "sha256:" + hashlib.sha256(secrets.token_bytes(16)).hexdigest()
    cached = ask(mirror.url, method, repo, cached_private["digest"], token, ranged)
    fresh = ask(mirror.url, method, repo, uncached, token, ranged)
    upstream_says = ask(upstream.api_url, method, repo, uncached, token, ranged)
    assert cached[:2] != (200, None) and cached[0] not in (206, 307), f"the cached blob was served: {cached}"
    assert cached == fresh, f"cached {cached} but uncached {fresh}: the answer tells the digest is cached"
    assert fresh[:2] == upstream_says[:2], f"the mirror answers {fresh[:2]}, the upstream itself {upstream_says[:2]}"

"""Fetching ahead of the client: what a manifest names (registry/contents.py) and the bounds
of the fetches (cache/ahead.py). The fetches themselves run against the real upstream in
tests/integration/test_cache.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from hubrewrite.cache import ahead
from hubrewrite.cache.ahead import AheadFetches
from hubrewrite.realms import Realms
from hubrewrite.registry.contents import contents
from hubrewrite.registry.upstream import Upstream

PAYLOADS = Path(__file__).parent / "payloads"


def payload(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def test_an_image_manifest_names_its_config_and_layers():
    doc = json.loads(payload("docker_image.json"))
    named = contents(payload("docker_image.json"), "application/vnd.docker.distribution.manifest.v2+json")
    assert [b.digest for b in named.blobs] == [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]
    assert named.blobs[1].size == doc["layers"][0]["size"] and named.manifests == []


def test_an_index_names_its_platforms_not_its_attestations():
    named = contents(payload("oci_index_attestations.json"), "application/vnd.oci.image.index.v1+json")
    assert len(named.manifests) == 2 and named.blobs == []
    assert all(m.media_type == "application/vnd.oci.image.manifest.v1+json" for m in named.manifests)


def test_foreign_layers_odd_entries_and_other_bodies_name_nothing():
    image = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
             "config": {"digest": "sha256:" + "a" * 64, "size": 10},
             "layers": [{"digest": "sha256:" + "b" * 64, "size": 5, "urls": ["https://elsewhere.example/x"]},
                        {"digest": "sha256:../../etc", "size": 5}, {"digest": "sha256:" + "c" * 64, "size": "5"},
                        {"digest": "sha256:" + "d" * 64, "size": -1}, "junk"]}
    named = contents(json.dumps(image).encode(), "application/vnd.oci.image.manifest.v1+json")
    assert [b.digest for b in named.blobs] == ["sha256:" + "a" * 64]
    assert contents(b"not json", "application/vnd.oci.image.manifest.v1+json") is None
    assert contents(payload("schema1_signed.json"), "application/vnd.docker.distribution.manifest.v1+prettyjws") is None
    assert contents(b"[]", "") is None


def test_fetches_are_bounded_in_parallel_bytes_and_per_client(monkeypatch):
    monkeypatch.setattr(ahead, "PARALLEL", 2)
    monkeypatch.setattr(ahead, "MAX_BYTES", 1000)
    monkeypatch.setattr(ahead, "PER_CLIENT", 3)

    async def scenario() -> None:
        fetches = AheadFetches()
        release = asyncio.Event()
        running: list[str] = []

        def work(name: str):
            async def fetch(f) -> None:
                running.append(name)
                await release.wait()
            return fetch

        a, b = ("id-a", "10.0.0.1"), ("id-b", "10.0.0.2")
        assert fetches.submit(("blob", "1"), a, 100, work("1"))
        assert not fetches.submit(("blob", "1"), b, 100, work("1 again"))  # the same thing: fetched once
        assert fetches.submit(("blob", "2"), a, 100, work("2"))
        assert fetches.submit(("blob", "3"), a, 100, work("3"))
        assert not fetches.submit(("blob", "4"), a, 100, work("4"))  # per client
        assert not fetches.submit(("blob", "5"), b, 800, work("5"))  # bytes in flight: 300 + 800 > 1000
        assert fetches.submit(("blob", "6"), b, 700, work("6"))
        await asyncio.sleep(0.05)
        assert running == ["1", "2"]  # two at once
        release.set()
        await asyncio.sleep(0.05)
        assert sorted(running) == ["1", "2", "3", "6"] and fetches.in_flight() == 0
        assert fetches.submit(("blob", "4"), a, 100, work("4"))  # bounds free again
        monkeypatch.setattr(ahead, "MAX_FETCHES", 1)
        assert not fetches.submit(("blob", "7"), b, 1, work("7"))  # all clients together
        await fetches.close()

    asyncio.run(scenario())


def test_a_client_waits_only_for_a_fetch_that_is_asking_the_upstream(monkeypatch):
    monkeypatch.setattr(ahead, "PARALLEL", 1)

    async def scenario() -> None:
        fetches = AheadFetches()
        gate = asyncio.Event()

        async def asking(fetch) -> None:
            await gate.wait()

        fetches.submit(("blob", "running"), ("x", "y"), 1, asking)
        fetches.submit(("blob", "queued"), ("x", "y"), 1, asking)
        await asyncio.sleep(0.01)
        started = asyncio.get_running_loop().time()
        await fetches.settled(("blob", "queued"), 5)  # still waiting for its place: not waited for
        await fetches.settled(("blob", "none"), 5)
        assert asyncio.get_running_loop().time() - started < 0.1
        asyncio.get_running_loop().call_later(0.2, gate.set)
        await fetches.settled(("blob", "running"), 5)
        assert asyncio.get_running_loop().time() - started >= 0.19
        await fetches.close()

    asyncio.run(scenario())


def test_an_upstreams_anonymous_challenge_is_given_again_for_a_while(monkeypatch):
    realms, up = Realms(), Upstream("https", "registry-1.docker.io", 443, "docker.io")
    challenge = [("WWW-Authenticate", 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"')]
    realms.remember_base(up, 200, challenge, b"")  # not a challenge: not remembered
    realms.remember_base(up, 401, [("Content-Type", "application/json")], b"{}")  # no Bearer realm: neither
    assert realms.base_answer(up) is None
    realms.remember_base(up, 401, challenge, b'{"errors":[]}')
    assert realms.base_answer(up) == (401, challenge, b'{"errors":[]}')
    import hubrewrite.realms as module
    monkeypatch.setattr(module, "BASE_ANSWER_SECONDS", -1.0)
    assert realms.base_answer(up) is None

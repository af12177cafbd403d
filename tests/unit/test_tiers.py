"""The tiered cache (cache/tiers.py) on a real local store: the order of its answers, the claim
of a blob's one download, and the one Protocol both stores implement."""

import asyncio
import hashlib
import inspect

from hubrewrite.access.confirmations import AccessMemory
from hubrewrite.cache.downloads import Downloads
from hubrewrite.cache.shared import SharedStore
from hubrewrite.cache.store import Store
from hubrewrite.cache.tier import Tier
from hubrewrite.cache.tiers import Asker, Claimed, Following, Local, Miss, TieredCache
from hubrewrite.observe.metrics import Metrics

from .test_store import put_blob


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def local_cache(tmp_path) -> TieredCache:
    store = Store(tmp_path, 0)
    return TieredCache(store, Downloads(store), AccessMemory(300, 3600), Metrics())


def test_both_stores_implement_the_tier_protocol():
    """The order is written once for any tier: each store answers every member, alike."""
    members = [name for name in vars(Tier) if not name.startswith("_")]
    assert set(members) >= {"blob", "manifest", "record", "put_manifest", "put_record"}
    for store in (Store, SharedStore):
        for name in members:
            ours, theirs = inspect.signature(getattr(Tier, name)), inspect.signature(getattr(store, name))
            assert list(theirs.parameters) == list(ours.parameters), (store.__name__, name)
            assert inspect.iscoroutinefunction(getattr(store, name)) == inspect.iscoroutinefunction(getattr(Tier, name))


def test_a_blob_is_missed_claimed_once_followed_then_found(tmp_path):
    cache = local_cache(tmp_path)
    digest = digest_of(b"a layer")

    async def scenario():
        assert isinstance(await cache.find_blob(digest), Miss)
        claimed = await cache.claim_blob(digest)
        assert isinstance(claimed, Claimed) and not claimed.bucket_locked
        # a second asker follows the first one's download rather than claiming another
        assert isinstance(await cache.claim_blob(digest), Following)
        assert isinstance(await cache.find_blob(digest), Following)
        cache.release(claimed)  # not started: the claim goes
        assert isinstance(await cache.find_blob(digest), Miss)
        put_blob(cache.store, b"a layer")
        assert await cache.find_blob(digest) == Local(len(b"a layer"))
        assert cache.use_blob(digest) == len(b"a layer") and cache.small_blob(digest) == b"a layer"

    asyncio.run(scenario())


def test_a_claim_lost_to_a_committed_blob_finds_it(tmp_path):
    cache = local_cache(tmp_path)
    digest = put_blob(cache.store, b"committed meanwhile")
    assert asyncio.run(cache.claim_blob(digest)) == Local(len(b"committed meanwhile"))
    assert digest not in cache.downloads.running


def test_access_and_membership_are_remembered_per_asker(tmp_path):
    cache = local_cache(tmp_path)
    digest = digest_of(b"private")
    alice = Asker("https://registry.example", "team/app", "alice")
    bob = Asker("https://registry.example", "team/app", "bob")
    assert not cache.known(alice, digest)
    cache.confirm(alice, digest)
    assert cache.known(alice, digest) and not cache.known(bob, digest)
    assert cache.store.is_member(alice.upstream, alice.repository, digest)
    cache.confirm(bob, digest, member=False)
    assert cache.known(bob, digest)  # the repository's membership was recorded for alice already
    assert asyncio.run(cache.known_stale_anywhere(bob, digest))


def test_manifests_are_kept_only_when_their_bytes_are_the_digest(tmp_path):
    cache = local_cache(tmp_path)
    body = b'{"schemaVersion": 2}'
    assert not cache.keep_manifest(digest_of(b"other"), "application/json", body)
    assert cache.keep_manifest(digest_of(body), "application/json", body)
    assert asyncio.run(cache.manifest_here(digest_of(body))) == len(body)
    assert cache.manifest(digest_of(body)) == ("application/json", body)

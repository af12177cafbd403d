import base64
import json
import time

from hubrewrite.access.confirmations import ANONYMOUS, AccessMemory, client_identity, token_lifetime


def jwt(exp: float) -> str:
    def b64(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'RS256'})}.{b64({'exp': exp})}.sig"


def test_identity_is_a_hash_never_the_secret():
    assert client_identity(None) == ANONYMOUS
    ident = client_identity("Bearer secret-token")
    assert "secret" not in ident and len(ident) == 64
    assert ident == client_identity("Bearer secret-token") != client_identity("Bearer other")


def test_token_lifetime_from_jwt_exp():
    now = time.time()
    assert 290 < token_lifetime(f"Bearer {jwt(now + 300)}", 60, now) <= 300
    assert token_lifetime(f"Bearer {jwt(now - 5)}", 60, now) == 0
    assert token_lifetime("Bearer opaque", 60, now) == 60
    assert token_lifetime("Basic eDp5", 60, now) == 60


def test_token_lifetime_reads_exp_as_the_jwt_decoder_does():
    """registry/jwt.py's reading: a finite number is an ``exp``; anything else gets the default."""
    now = time.time()
    assert 299 < token_lifetime(f"Bearer {jwt(now + 300.5)}", 60, now) <= 301
    assert token_lifetime(f"Bearer {jwt(now + 10**6)}", 60, now) == 3600  # never trusted beyond an hour
    for exp in (float("inf"), float("nan"), True, str(int(now + 300)), None):
        assert token_lifetime(f"Bearer {jwt(exp)}", 60, now) == 60, exp


def test_confirmation_is_per_token_and_repository():
    memory = AccessMemory(60, 3600)
    alice = f"Bearer {jwt(time.time() + 300)}"
    memory.confirm(client_identity(alice), alice, "https://r", "private/x")
    assert memory.allowed(client_identity(alice), "https://r", "private/x")
    assert not memory.allowed(client_identity(alice), "https://r", "private/y")
    assert not memory.allowed(client_identity("Bearer mallory"), "https://r", "private/x")


def test_expired_token_opens_nothing_private_in_stale_mode_unless_a_grace_is_set():
    expired = f"Bearer {jwt(time.time() - 1)}"
    valid = f"Bearer {jwt(time.time() + 300)}"
    for grace, expired_allowed in ((0, False), (600, True)):
        memory = AccessMemory(60, 3600, expired_grace=grace)
        memory.confirm(client_identity(expired), expired, "https://r", "a/b")
        memory.confirm(client_identity(valid), valid, "https://r", "a/b")
        assert not memory.allowed(client_identity(expired), "https://r", "a/b")
        assert memory.allowed_stale(client_identity(expired), "https://r", "a/b") is expired_allowed
        assert memory.allowed_stale(client_identity(valid), "https://r", "a/b")
    memory = AccessMemory(60, 0)
    memory.confirm(client_identity(valid), valid, "https://r", "a/b")
    assert not memory.allowed_stale(client_identity(valid), "https://r", "a/b")


def test_anonymous_grants_mark_repositories_public_for_stale_serving():
    memory = AccessMemory(60, 3600)
    memory.note_anonymous_token("anon-token")
    anon = "Bearer anon-token"
    memory.confirm(client_identity(anon), anon, "https://r", "library/alpine")
    other = client_identity("Bearer someone-else")
    assert memory.allowed_stale(other, "https://r", "library/alpine")
    assert not memory.allowed_stale(other, "https://r", "private/x")

import base64

import pytest

from hubrewrite.access.accounts import (
    AccountsError,
    MirrorAccounts,
    hash_password,
    load_users,
    main,
    parse_basic,
    split_credentials,
)
from hubrewrite.access.credentials import UpstreamCredentials
from hubrewrite.access.issued import IssuedTokens
from hubrewrite.access.rules import PolicyError, RepositoryRules
from hubrewrite.registry.errors import RegistryError as SignInRefused
from hubrewrite.access.issued import REFRESH, UPSTREAM
from hubrewrite.registry.tokens import parse_grant


def test_users_file_with_bcrypt_and_argon2(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"# mirror users\nann:{hash_password('pw-a')}\nbob:{hash_password('pw-b', 'argon2')}\n")
    accounts = MirrorAccounts(load_users(path))
    assert accounts.verify("ann", "pw-a") and accounts.verify("ann", "pw-a")  # second from memory
    assert accounts.verify("bob", "pw-b")
    assert not accounts.verify("ann", "pw-b")
    assert not accounts.verify("bob", "wrong")
    assert not accounts.verify("nobody", "pw-a")


@pytest.mark.parametrize("text", ["", "ann\n", "ann:plaintext\n", "ann:$2b$x\nann:$2b$y\n"])
def test_bad_users_files(tmp_path, text):
    path = tmp_path / "users"
    path.write_text(text)
    with pytest.raises(AccountsError):
        load_users(path)


def test_mirror_passwords_cannot_hold_the_separator():
    with pytest.raises(AccountsError):
        hash_password("a:b")


def test_users_line_printer(capsys, monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("secret\n"))
    main(["carol"])
    user, hashed = capsys.readouterr().out.strip().split(":", 1)
    assert user == "carol" and MirrorAccounts({"carol": hashed}).verify("carol", "secret")


def test_credential_split():
    assert split_credentials("ann", "pw").upstream_basic is None
    both = split_credentials("ann", "pw:alice:up:with:colons")
    assert (both.mirror_user, both.mirror_password, both.upstream_user, both.upstream_password) == (
        "ann", "pw", "alice", "up:with:colons")
    assert both.upstream_basic == "Basic " + base64.b64encode(b"alice:up:with:colons").decode()
    with pytest.raises(AccountsError):
        split_credentials("ann", "pw:alice")


def test_parse_basic():
    assert parse_basic("Basic " + base64.b64encode(b"u:p:q").decode()) == ("u", "p:q")
    assert parse_basic("Bearer x") is None
    assert parse_basic("Basic !!!") is None
    assert parse_basic(None) is None


def test_sealed_tokens_expire_and_need_the_key(monkeypatch):
    issued = IssuedTokens(b"k" * 32)
    token = issued.seal(UPSTREAM, "ann", 30, "upstream-jwt")
    assert token.startswith("hub1.") and "upstream-jwt" not in token and "ann" not in token
    assert issued.user_of(token) == "ann" and issued.open(token).upstream_token == "upstream-jwt"
    assert IssuedTokens(b"k" * 32).user_of(token) == "ann"  # another process with the key
    assert IssuedTokens(b"x" * 32).user_of(token) is None  # another key
    assert issued.user_of(token[:-2] + "AA") is None  # tampered
    assert issued.user_of("other") is None and issued.user_of(None) is None
    import hubrewrite.access.issued as sealing
    real = sealing.time.time
    monkeypatch.setattr(sealing.time, "time", lambda: real() + 31)
    assert issued.user_of(token) is None


def test_allow_and_deny_patterns():
    rules = RepositoryRules.parse(["docker.io/library/*", "ghcr.io/*"], ["docker.io/library/busybox"])
    assert rules.permits("docker.io", "library/alpine")
    assert not rules.permits("docker.io", "library/busybox")
    assert not rules.permits("docker.io", "team/app")
    assert rules.permits("ghcr.io", "owner/tool")
    assert RepositoryRules().permits("quay.io", "x/y")
    with pytest.raises(PolicyError):
        RepositoryRules.parse(["nginx"], [])


def test_server_side_credentials_from_file_and_environment(tmp_path):
    path = tmp_path / "creds"
    path.write_text("# operator accounts\ndocker.io hubuser pass word\n")
    creds = UpstreamCredentials.load(str(path), {"docker.io", "ghcr.io"},
                                     {"HUB_UPSTREAM_CREDENTIALS_GHCR_IO": "octo:ghp_x"})
    assert creds.basic_for("docker.io") == "Basic " + base64.b64encode(b"hubuser:pass word").decode()
    assert creds.basic_for("ghcr.io") == "Basic " + base64.b64encode(b"octo:ghp_x").decode()
    assert creds.basic_for("quay.io") is None
    assert "pass word" not in repr(creds) and "ghp_x" not in repr(creds)
    path.write_text("quay.io u p\n")
    with pytest.raises(PolicyError):
        UpstreamCredentials.load(str(path), {"docker.io"}, {})
    path.write_text("docker.io onlyuser\n")
    with pytest.raises(PolicyError) as e:
        UpstreamCredentials.load(str(path), {"docker.io"}, {})
    assert "onlyuser" not in str(e.value)


def test_sign_in_drops_the_mirror_part():
    import asyncio
    import json

    from hubrewrite.access.accounts import basic_header, sign_in

    accounts = MirrorAccounts({"ann": hash_password("pw")})
    issued = IssuedTokens(b"k" * 32)

    def run(authorization, form=None):
        return asyncio.run(sign_in(accounts, issued, authorization, form))

    assert run(basic_header("ann", "pw")) == ("ann", None, None)
    assert run(basic_header("ann", "pw:alice:x")) == ("ann", basic_header("alice", "x"), None)
    user, auth, form = run(None, [("grant_type", "password"), ("username", "ann"), ("password", "pw:alice:x"), ("scope", "s")])
    assert (user, auth, form) == ("ann", None, [("grant_type", "password"), ("scope", "s"), ("username", "alice"), ("password", "x")])
    for bad in (None, basic_header("ann", "nope"), basic_header("ann", "pw:alice")):
        with pytest.raises(SignInRefused):
            run(bad)
    with pytest.raises(SignInRefused):
        run(None, [("grant_type", "refresh_token"), ("refresh_token", "r")])
    answer = json.dumps({"token": "t", "refresh_token": "r", "expires_in": 60}).encode()
    sealed = json.loads(issued.sealed_grant("ann", parse_grant(answer), answer))
    assert sealed["access_token"] == sealed["token"] != "t"  # a client that POSTed reads access_token
    assert issued.open(sealed["token"]).upstream_token == "t" and issued.user_of(sealed["token"]) == "ann"
    assert issued.open(sealed["refresh_token"]).kind == REFRESH
    assert issued.user_of(sealed["refresh_token"]) is None  # a refresh token opens nothing by itself
    user, _, form = run(None, [("grant_type", "refresh_token"), ("refresh_token", sealed["refresh_token"])])
    assert user == "ann" and form == [("grant_type", "refresh_token"), ("refresh_token", "r")]  # the upstream's goes on
    assert parse_grant(b"not json") is None

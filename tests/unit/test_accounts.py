import asyncio
import base64
import json
import logging
import os
import time

import bcrypt
import pytest

import hubrewrite.access.issued as sealing
from hubrewrite.access import users_file
from hubrewrite.access.accounts import (
    AccountsError,
    MirrorAccounts,
    basic_header,
    hash_password,
    main,
    parse_basic,
    sign_in,
    split_credentials,
)
from hubrewrite.access.credentials import UpstreamCredentials
from hubrewrite.access.issued import OFFLINE, OWN, PREFIX, REFRESH, UPSTREAM, IssuedTokens
from hubrewrite.access.rules import PolicyError, RepositoryRules
from hubrewrite.access.users_file import load_users
from hubrewrite.registry.errors import RegistryError as SignInRefused
from hubrewrite.registry.tokens import parse_grant

KEY = b"k" * 32
# what open() compares is the users-file line, not the password: made-up hashes will do
ANN_HASH, ANN_NEW_HASH, BOB_HASH = "$2b$04$" + "a" * 53, "$2b$04$" + "n" * 53, "$2b$04$" + "b" * 53


def quick_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def later(monkeypatch, seconds: float) -> None:
    """The clock of sealed tokens moved on by ``seconds``."""
    real = time.time
    monkeypatch.setattr(sealing.time, "time", lambda: real() + seconds)


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
    accounts = MirrorAccounts({"ann": ANN_HASH})
    issued = IssuedTokens(KEY)
    token = issued.seal(UPSTREAM, issued.holder("ann", ANN_HASH), 30, "upstream-jwt")
    assert token.startswith("hub1.") and "upstream-jwt" not in token and "ann" not in token
    opened = issued.open(token, accounts)
    assert opened.user == "ann" and opened.upstream_token == "upstream-jwt"
    assert IssuedTokens(KEY).open(token, accounts).user == "ann"  # another process with the key
    assert IssuedTokens(b"x" * 32).open(token, accounts) is None  # another key
    assert issued.open(token[:-2] + "AA", accounts) is None  # tampered
    assert issued.open("other", accounts) is None and issued.open(None, accounts) is None
    later(monkeypatch, 31)
    assert issued.open(token, accounts) is None


def test_a_sealed_token_opens_only_while_its_user_is_in_the_users_file():
    issued = IssuedTokens(KEY)
    now = MirrorAccounts({"ann": ANN_HASH, "bob": BOB_HASH})
    token = issued.seal(UPSTREAM, issued.holder("ann", ANN_HASH), 60, "t")
    assert issued.open(token, now).user == "ann"
    assert issued.open(token, MirrorAccounts({"bob": BOB_HASH})) is None  # ann removed
    assert issued.open(token, MirrorAccounts({"ann": ANN_NEW_HASH})) is None  # a new password, or re-added with one
    assert issued.open(token, MirrorAccounts({"ann": BOB_HASH})) is None  # another mirror's ann
    assert issued.open(token, MirrorAccounts({"ann": ANN_HASH})).user == "ann"  # the same line: the same account
    assert issued.open(token, None) is None  # a mirror without accounts honours no user's token
    for kind in (OWN, OFFLINE):  # every kind that names a user carries the generation
        named = issued.seal(kind, issued.holder("ann", ANN_HASH), 60)
        assert issued.open(named, now).user == "ann" and issued.open(named, MirrorAccounts({"bob": BOB_HASH})) is None
    anonymous = issued.seal(OFFLINE, None, 60)  # (admission asks a mirror with accounts for a user)
    assert issued.open(anonymous, None).user is None and issued.open(anonymous, now).user is None
    # a token sealed before users had generations opens for no user
    old = PREFIX + issued._fernet.encrypt(json.dumps({"k": UPSTREAM, "u": "ann", "t": "t", "e": time.time() + 60})
                                          .encode()).decode()
    assert issued.open(old, now) is None


def test_refresh_tokens_open_only_the_token_endpoint_and_access_tokens_only_v2():
    issued = IssuedTokens(KEY)
    accounts = MirrorAccounts({"ann": ANN_HASH})
    ann = issued.holder("ann", ANN_HASH)
    refresh, access = issued.seal(REFRESH, ann, 60, "upstream-refresh"), issued.seal(UPSTREAM, ann, 60, "jwt")
    assert issued.open(refresh, accounts) is None  # /v2/ opens the access kinds only
    assert issued.open(refresh, accounts, kinds=(REFRESH,)).upstream_token == "upstream-refresh"
    assert issued.open(access, accounts, kinds=(REFRESH,)) is None
    form = [("grant_type", "refresh_token"), ("refresh_token", access)]
    with pytest.raises(SignInRefused):
        asyncio.run(sign_in(accounts, issued, None, form))


def test_refresh_never_outlives_the_session(monkeypatch):
    """A session of 4 s (REFRESH_TOKEN_LIFETIME in a running mirror): every token sealed
    from a refresh expires by its end, and at its end the refresh is refused."""
    accounts = MirrorAccounts({"ann": quick_hash("pw")})
    issued = IssuedTokens(KEY, refresh_lifetime=4)
    answer = json.dumps({"token": "t", "refresh_token": "r", "expires_in": 60}).encode()

    def refreshed(refresh_token):
        holder, _, _ = asyncio.run(sign_in(accounts, issued, None, [("grant_type", "refresh_token"),
                                                                    ("refresh_token", refresh_token)]))
        return holder, json.loads(issued.sealed_grant(holder, parse_grant(answer), answer))

    holder, _, _ = asyncio.run(sign_in(accounts, issued, basic_header("ann", "pw"), None))
    session_end = holder.session_end
    assert session_end == pytest.approx(time.time() + 4, abs=1)
    first = json.loads(issued.sealed_grant(holder, parse_grant(answer), answer))
    assert first["expires_in"] <= 4  # the session ends before the upstream's token would
    assert issued.open(first["refresh_token"], accounts, kinds=(REFRESH,)).expires == session_end
    later(monkeypatch, 2)
    holder, second = refreshed(first["refresh_token"])
    assert holder.session_end == session_end  # the same session, not a new one
    for token, kinds in ((second["refresh_token"], (REFRESH,)), (second["token"], sealing.ACCESS)):
        assert issued.open(token, accounts, kinds=kinds).expires <= session_end
    later(monkeypatch, 4.5)
    for token in (first["refresh_token"], second["refresh_token"]):
        with pytest.raises(SignInRefused):
            refreshed(token)


def test_users_file_read_again_when_it_changes(tmp_path, monkeypatch, caplog):
    """Removal, a new password, a malformed and a missing file (the accounts before are kept,
    one log line each), and the file back; what was remembered as verified is not trusted
    across a change."""
    monkeypatch.setattr(users_file, "CHECK_INTERVAL", 0.0)
    caplog.set_level(logging.INFO, "hub_rewrite")
    path = tmp_path / "users"
    ann, bob = quick_hash("pw-a"), quick_hash("pw-b")
    path.write_text(f"ann:{ann}\nbob:{bob}\n")
    accounts = MirrorAccounts.from_file(path)
    assert accounts.verify("bob", "pw-b") and accounts.verify("ann", "pw-a")  # now remembered as verified
    path.write_text(f"ann:{ann}\n")
    assert not accounts.verify("bob", "pw-b") and accounts.password_hash("bob") is None
    path.write_text(f"ann:{quick_hash('pw-a2')}\n")
    assert not accounts.verify("ann", "pw-a") and accounts.verify("ann", "pw-a2")
    assert sum("read again" in r.message for r in caplog.records) == 2
    for broken in ("ann:plaintext\n", None):
        caplog.clear()
        path.unlink() if broken is None else path.write_text(broken)
        for _ in range(3):
            assert accounts.verify("ann", "pw-a2")
        assert [r.levelname for r in caplog.records] == ["WARNING"], caplog.text
        assert "keeping the accounts read before (1 users)" in caplog.text
    path.write_text(f"ann:{ann}\nbob:{bob}\n")
    assert accounts.verify("bob", "pw-b") and not accounts.verify("ann", "pw-a2")


def test_users_file_rewritten_within_one_timestamp_tick(tmp_path, monkeypatch):
    """Same size, same inode, same mtime: a file read while its mtime was recent is read
    again, so an edit right after that read is not missed."""
    monkeypatch.setattr(users_file, "CHECK_INTERVAL", 0.0)
    path = tmp_path / "users"
    path.write_text(f"ann:{ANN_HASH}\n")
    accounts = MirrorAccounts.from_file(path)
    mtime = os.stat(path).st_mtime_ns
    path.write_text(f"ann:{ANN_NEW_HASH}\n")
    os.utime(path, ns=(mtime, mtime))
    assert accounts.password_hash("ann") == ANN_NEW_HASH


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
    accounts = MirrorAccounts({"ann": hash_password("pw")})
    issued = IssuedTokens(KEY)

    def run(authorization, form=None):
        holder, upstream_authorization, rest = asyncio.run(sign_in(accounts, issued, authorization, form))
        return holder.user, upstream_authorization, rest

    assert run(basic_header("ann", "pw")) == ("ann", None, None)
    assert run(basic_header("ann", "pw:alice:x")) == ("ann", basic_header("alice", "x"), None)
    user, auth, form = run(None, [("grant_type", "password"), ("username", "ann"), ("password", "pw:alice:x"), ("scope", "s")])
    assert (user, auth, form) == ("ann", None, [("grant_type", "password"), ("scope", "s"), ("username", "alice"), ("password", "x")])
    for bad in (None, basic_header("ann", "nope"), basic_header("ann", "pw:alice")):
        with pytest.raises(SignInRefused):
            run(bad)
    with pytest.raises(SignInRefused):
        run(None, [("grant_type", "refresh_token"), ("refresh_token", "r")])
    holder = issued.holder("ann", accounts.password_hash("ann"))
    answer = json.dumps({"token": "t", "refresh_token": "r", "expires_in": 60}).encode()
    sealed = json.loads(issued.sealed_grant(holder, parse_grant(answer), answer))
    assert sealed["access_token"] == sealed["token"] != "t"  # a client that POSTed reads access_token
    opened = issued.open(sealed["token"], accounts)
    assert opened.upstream_token == "t" and opened.user == "ann"
    assert issued.open(sealed["refresh_token"], accounts, kinds=(REFRESH,)).kind == REFRESH
    assert issued.open(sealed["refresh_token"], accounts) is None  # a refresh token opens no /v2/
    user, _, form = run(None, [("grant_type", "refresh_token"), ("refresh_token", sealed["refresh_token"])])
    assert user == "ann" and form == [("grant_type", "refresh_token"), ("refresh_token", "r")]  # the upstream's goes on
    assert parse_grant(b"not json") is None

"""Issue 17, items 2 and 9: a sealed token opens only while its user is in the users file.

Three mirrors share one key (``hub_blob_secret``), so each can open the others'
tokens: A and B with accounts (different users files), C open (no accounts).
Users are added to, changed in and removed from A's users file while A runs;
the file is looked at again about once a second, so each change is followed by
``settle()``. What must hold: a removed user's access and refresh tokens (got
as dockerd asks, GET with Basic and ``offline_token``, and as containerd asks,
a POST password grant with ``access_type=offline``), password and cached
password stop working, in stale mode too; a changed password ends the older
tokens, the new one works; re-adding a user with a new password revives no old
token; a mirror refuses the tokens of users its own file does not have (with
the same password); refreshing never extends the session; a refresh token on
``/v2/`` is refused and reaches nothing upstream, an access token is no refresh
token; a malformed users file keeps the old accounts with one log line.
Refusals are checked to reach nothing upstream (the edge's and the token
service's logs), and alice's private repository behind bob's password (his
upstream part) is what a leftover token would open.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import bcrypt
import httpx
import pytest

from hubrewrite.access.issued import IssuedTokens
from tests.support.mirror import Mirror

from .helpers import INDEX_ACCEPT, SERVICE
from .setups import log_marks, upstream_saw

PRIVATE = "private/secret"  # alice (the upstream part of every sign-in here) may read it
SETTLE = 1.6  # the mirror looks at its users file once a second at most


def settle() -> None:
    time.sleep(SETTLE)


class UsersFile:
    """A users file rewritten under the running mirror."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: dict[str, str] = {}
        self.passwords: dict[str, str] = {}

    def add(self, user: str, password: str | None = None) -> str:
        """``user`` with a new password (or ``password``), replacing any older line of theirs."""
        password = password or f"{user}-{secrets.token_urlsafe(10)}"
        self.lines[user] = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        self.passwords[user] = password
        self.write()
        return password

    def copy_line(self, user: str, other: UsersFile) -> None:
        """The same line as ``other`` has for ``user`` (the same account on two mirrors)."""
        self.lines[user], self.passwords[user] = other.lines[user], other.passwords[user]
        self.write()

    def remove(self, user: str) -> None:
        del self.lines[user]
        self.write()

    def write(self) -> None:
        self.path.write_text("".join(f"{u}:{h}\n" for u, h in self.lines.items()))


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("account-tokens-key") / "secret"
    path.write_text(secrets.token_hex(32) + "\n")
    return path


def accounts_mirror(base: Path, upstream, key_file: Path, users: UsersFile | None, *settings: str) -> Mirror:
    options = {"hub_cache_dir": str(base / "cache"), "hub_blob_secret": str(key_file)}
    if users is not None:
        options["hub_users_file"] = str(users.path)
    args = [a for s in settings for a in ("--set", s)]
    mirror = Mirror(base / "m", upstream, options=options, extra_args=args).start()
    mirror.users = users
    return mirror


@pytest.fixture(scope="module")
def mirrors(upstream, key_file, tmp_path_factory):
    """(A, B, C): A and B with accounts (A also guards its metrics with them), C open; one key.
    Each test's users are there from the start: a test changes them under the running mirror."""
    bases = [tmp_path_factory.mktemp(f"account-tokens-{name}") for name in "abc"]
    users_a, users_b = UsersFile(bases[0] / "users"), UsersFile(bases[1] / "users")
    for user in ("bob", "erin", "frank", "gina", "ivy", "jo", "lou", "kim", "max"):
        users_a.add(user)
    for user in ("gina", "hank"):  # B's gina is another account (another password) than A's
        users_b.add(user)
    users_b.copy_line("ivy", users_a)  # one account on both mirrors
    started = []
    try:
        for base, users, settings in ((bases[0], users_a, ("hub_metrics_auth=true",)), (bases[1], users_b, ()),
                                      (bases[2], None, ())):
            started.append(accounts_mirror(base, upstream, key_file, users, *settings))
        yield tuple(started)
    finally:
        for m in started:
            m.stop()


@pytest.fixture(autouse=True)
def no_traceback(mirrors):
    starts = [len(m.log_text()) for m in mirrors]
    yield
    for m, start in zip(mirrors, starts):
        assert "Traceback" not in m.log_text()[start:], m.log_text()[start:][-3000:]


def with_upstream_part(upstream, password: str) -> str:
    return f"{password}:alice:{upstream.users['alice']}"


def sign_in_get(m: Mirror, user: str, password: str, repo: str = PRIVATE) -> httpx.Response:
    """As dockerd after docker login: GET with Basic and offline_token (a refresh token back)."""
    return httpx.get(f"{m.url}/token", auth=(user, password), timeout=15, params={
        "service": SERVICE, "scope": f"repository:{repo}:pull", "offline_token": "true", "client_id": "docker",
        "account": user})


def sign_in_post(m: Mirror, user: str, password: str, repo: str = PRIVATE) -> httpx.Response:
    """As containerd: a password grant form with access_type=offline."""
    return httpx.post(f"{m.url}/token", timeout=15, data={
        "grant_type": "password", "client_id": "containerd-client", "access_type": "offline", "service": SERVICE,
        "scope": f"repository:{repo}:pull", "username": user, "password": password})


def refresh(m: Mirror, refresh_token: str, repo: str = PRIVATE) -> httpx.Response:
    """As dockerd and containerd use a refresh token: a refresh_token grant form."""
    return httpx.post(f"{m.url}/token", timeout=15, data={
        "grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": "containerd-client",
        "service": SERVICE, "scope": f"repository:{repo}:pull"})


def grant(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def pull(m: Mirror, token: str, repo: str = PRIVATE, tag: str = "1.0") -> httpx.Response:
    return httpx.get(f"{m.url}/v2/{repo}/manifests/{tag}", timeout=15,
                     headers=[("Authorization", f"Bearer {token}"), *[("Accept", a) for a in INDEX_ACCEPT]])


def assert_sent_to_sign_in(r: httpx.Response, m: Mirror, what: str) -> None:
    assert r.status_code == 401, f"{what}: {r.status_code} {r.text[:200]}"
    assert r.headers.get("www-authenticate", "").startswith(f'Bearer realm="{m.url}/token'), (what, r.headers)


def assert_refused(r: httpx.Response, what: str) -> None:
    assert r.status_code == 401, f"{what}: {r.status_code} {r.text[:200]}"
    assert r.json().get("errors", [{}])[0].get("code") == "UNAUTHORIZED", f"{what}: not the mirror's answer: {r.text}"


def metrics_status(m: Mirror, user: str, password: str) -> int:
    return httpx.get(f"{m.url}/_hub/metrics", auth=(user, password), timeout=15).status_code


def nothing_upstream(upstream, marks: tuple[int, int], tokens_before: int) -> None:
    """Since ``marks``: no request for the private repository at the edge or the registry, none
    with credentials at the edge (a challenge may look up the token service's name, without),
    and none at the token service."""
    assert upstream_saw(upstream, marks, PRIVATE) == []
    assert [r for r in upstream.edge_requests()[marks[0]:] if r.get("authorization")] == []
    assert upstream.token_requests()[tokens_before:] == []


def sealed_payload(key_file: Path, token: str) -> dict:
    """What a sealed token holds, read with the shared key (the test knows it)."""
    fernet = IssuedTokens(key_file.read_text().strip().encode())._fernet
    return json.loads(fernet.decrypt(token.removeprefix("hub1.").encode()))


def signed_in(m: Mirror, upstream, user: str, password: str) -> list[dict]:
    """Grants of both sign-ins (dockerd's GET, containerd's POST) and of a refresh; each opens
    the private repository (alice's, by the upstream part of the password) now."""
    secret = with_upstream_part(upstream, password)
    grants = [grant(sign_in_get(m, user, secret)), grant(sign_in_post(m, user, secret))]
    grants.append(grant(refresh(m, grants[0]["refresh_token"])))
    for g in grants:
        assert g.get("refresh_token", "").startswith("hub1."), g
        assert pull(m, g["token"]).status_code == 200
    return grants


# ---------------------------------------------------------------- item 2


def test_removed_user_loses_every_token(mirrors, upstream):
    a = mirrors[0]
    password = a.users.passwords["bob"]
    grants = signed_in(a, upstream, "bob", password)
    assert metrics_status(a, "bob", password) == 200
    a.users.remove("bob")
    settle()
    marks, tokens_before = log_marks(upstream), len(upstream.token_requests())
    for i, g in enumerate(grants):
        assert_sent_to_sign_in(pull(a, g["token"]), a, f"access token {i} of the removed user")
        assert_refused(refresh(a, g["refresh_token"]), f"refresh token {i} of the removed user")
    secret = with_upstream_part(upstream, password)
    assert_refused(sign_in_get(a, "bob", secret), "the removed user's password (GET)")
    assert_refused(sign_in_post(a, "bob", secret), "the removed user's password (POST)")
    assert metrics_status(a, "bob", password) == 401, "the removed user's password, remembered as verified"
    nothing_upstream(upstream, marks, tokens_before)


def test_password_change_ends_older_tokens(mirrors, upstream):
    a = mirrors[0]
    old = a.users.passwords["erin"]
    grants = signed_in(a, upstream, "erin", old)
    assert metrics_status(a, "erin", old) == 200  # now remembered as verified
    new = a.users.add("erin")
    settle()
    marks, tokens_before = log_marks(upstream), len(upstream.token_requests())
    for i, g in enumerate(grants):
        assert_sent_to_sign_in(pull(a, g["token"]), a, f"access token {i} of the old password")
        assert_refused(refresh(a, g["refresh_token"]), f"refresh token {i} of the old password")
    assert_refused(sign_in_get(a, "erin", with_upstream_part(upstream, old)), "the old password")
    assert metrics_status(a, "erin", old) == 401, "the old password, remembered as verified"
    nothing_upstream(upstream, marks, tokens_before)
    signed_in(a, upstream, "erin", new)
    assert metrics_status(a, "erin", new) == 200


def test_readded_user_does_not_revive_old_tokens(mirrors, upstream):
    a = mirrors[0]
    first = a.users.passwords["frank"]
    grants = signed_in(a, upstream, "frank", first)
    a.users.remove("frank")
    settle()
    assert_sent_to_sign_in(pull(a, grants[0]["token"]), a, "removed")
    second = a.users.add("frank")
    settle()
    for i, g in enumerate(grants):
        assert_sent_to_sign_in(pull(a, g["token"]), a, f"access token {i} from before the removal")
        assert_refused(refresh(a, g["refresh_token"]), f"refresh token {i} from before the removal")
    signed_in(a, upstream, "frank", second)


def test_mirrors_sharing_a_key_refuse_users_they_do_not_have(mirrors, upstream):
    """gina on A and gina on B are different accounts (other passwords); hank is B's only;
    ivy has the same line in both files (one account: her tokens open both, which shows
    the key is shared); C has no accounts and takes no user's token."""
    a, b, c = mirrors
    gina = signed_in(a, upstream, "gina", a.users.passwords["gina"])
    hank = signed_in(b, upstream, "hank", b.users.passwords["hank"])
    marks, tokens_before = log_marks(upstream), len(upstream.token_requests())
    for other, grants, name in ((b, gina, "A's gina on B"), (a, hank, "B's hank on A"), (c, gina, "A's gina on C"),
                                (c, hank, "B's hank on C")):
        for i, g in enumerate(grants):
            assert_sent_to_sign_in(pull(other, g["token"]), other, f"{name}: access token {i}")
            assert_refused(refresh(other, g["refresh_token"]), f"{name}: refresh token {i}")
    nothing_upstream(upstream, marks, tokens_before)
    ivy = grant(sign_in_get(a, "ivy", with_upstream_part(upstream, a.users.passwords["ivy"])))
    assert pull(b, ivy["token"]).status_code == 200, "the same account on both mirrors"
    assert grant(refresh(b, ivy["refresh_token"]))["token"].startswith("hub1.")


def test_refresh_never_extends_the_session(mirrors, upstream, key_file):
    """The session ends REFRESH_TOKEN_LIFETIME after the password sign-in; a refresh
    hands out tokens that end by then (the end itself: tests/unit/test_accounts.py)."""
    a = mirrors[0]
    password = a.users.passwords["jo"]
    first = grant(sign_in_get(a, "jo", with_upstream_part(upstream, password)))
    session_end = sealed_payload(key_file, first["refresh_token"])["e"]
    time.sleep(1.2)
    token = first["refresh_token"]
    for i in range(2):
        refreshed = grant(refresh(a, token))
        token = refreshed["refresh_token"]
        assert sealed_payload(key_file, token)["e"] <= session_end, f"refresh {i} extended the session"
        assert sealed_payload(key_file, refreshed["token"])["e"] <= session_end
        assert pull(a, refreshed["token"]).status_code == 200


def test_removed_user_is_refused_in_stale_mode(mirrors, upstream):
    """With the token service and the registry down, a user signing in gets the mirror's
    offline token, which opens what anonymous clients pulled; not once the user is removed."""
    a = mirrors[0]
    password = a.users.passwords["lou"]
    token = grant(sign_in_get(a, "lou", password, "library/alpine"))["token"]
    assert pull(a, token, "library/alpine", "3.19").status_code == 200  # cached, seen pulled anonymously
    with upstream.service_stopped("token"), upstream.service_stopped("registry"):
        offline = grant(sign_in_get(a, "lou", password, "library/alpine"))["token"]
        assert pull(a, offline, "library/alpine", "3.19").status_code == 200, "the offline token opens the cache"
        a.users.remove("lou")
        settle()
        for what, t in (("access token", token), ("offline token", offline)):
            assert_sent_to_sign_in(pull(a, t, "library/alpine", "3.19"), a, f"the removed user's {what}, stale")
        assert_refused(sign_in_get(a, "lou", password, "library/alpine"), "the removed user's password, stale")


# ---------------------------------------------------------------- item 9


def test_refresh_token_is_no_access_token_and_back(mirrors, upstream):
    """A refresh token as ``Authorization: Bearer`` on /v2/ is refused by A and by the
    open C, and nothing reaches the registry; an access token in a refresh_token grant
    is refused without asking the token service."""
    a, _, c = mirrors
    password = a.users.passwords["kim"]
    g = grant(sign_in_get(a, "kim", with_upstream_part(upstream, password)))
    marks, tokens_before = log_marks(upstream), len(upstream.token_requests())
    for m in (a, c):
        for path in (f"/v2/{PRIVATE}/manifests/1.0", f"/v2/{PRIVATE}/tags/list", "/v2/"):
            r = httpx.get(f"{m.url}{path}", headers={"Authorization": f"Bearer {g['refresh_token']}"}, timeout=15)
            assert_sent_to_sign_in(r, m, f"refresh token on {path}")
    nothing_upstream(upstream, marks, tokens_before)
    assert_refused(refresh(a, g["token"]), "an access token as a refresh token")
    assert_refused(refresh(c, g["refresh_token"]), "a refresh token of A's at the open C's token endpoint")
    nothing_upstream(upstream, marks, tokens_before)


# ---------------------------------------------------------------- the users file


def test_malformed_users_file_keeps_the_old_accounts(mirrors, upstream):
    a = mirrors[0]
    password = a.users.passwords["max"]
    token = grant(sign_in_get(a, "max", password, "library/alpine"))["token"]
    log_start = len(a.log_text())
    for broken in ("max:not-a-hash\n", None):  # malformed, then missing
        if broken is None:
            a.users.path.unlink()
        else:
            a.users.path.write_text(broken)
        settle()
        for _ in range(3):  # over several looks at the file
            assert pull(a, token, "library/alpine", "3.19").status_code == 200
            grant(sign_in_get(a, "max", password, "library/alpine"))
            time.sleep(0.6)
    said = [line for line in a.log_text()[log_start:].splitlines() if "hub_users_file" in line]
    assert len(said) == 2 and all("keeping" in line for line in said), said  # one line per broken state
    ned = a.users.add("ned")  # the file whole again, with one more user
    settle()
    grant(sign_in_get(a, "ned", ned, "library/alpine"))
    assert "read again" in a.log_text()[log_start:]

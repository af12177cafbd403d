"""Issue 9, item 2: scopes, as token services read them, never slip past deny rules.

The mirror holds server-side upstream credentials (alice's, for docker.io by
environment variable, for ghcr.io from a file) and denies docker.io/private/secret
and ghcr.io/private/*, repositories alice may read. Anonymous clients ask the
mirror's token endpoint for tokens in every syntax token services accept
(spaces as %20 and +, repeated parameters, tabs and newlines, a POST form as
containerd sends it, resource classes, the registry's own name as a prefix,
encoded separators, /token/<registry>, a host-mapped name). Each token is then
used where an attacker would use it: against the registry itself, bypassing
the mirror. The registry must refuse the denied repository's manifest with it,
while the allowed scope in the same request works. Positive controls show that
the credentials are in use (a private repository alice may read and the rules
allow opens) and that the same scope string asked of the token service
directly as alice does open the denied repository.
"""

from __future__ import annotations

import os
import secrets
from urllib.parse import quote, urlencode

import httpx
import pytest

from tests.integration.test_routing import HOST_MAPPED, WIDE_LOG, table_args
from tests.support.mirror import Mirror
from tests.support.token_server import decode_jwt_unverified

from .helpers import INDEX_ACCEPT, SERVICE, fresh_image

DENIED = "repository:private/secret:pull"
ALLOWED = "repository:library/alpine:pull"
GHCR_SERVICE = "ghcr.io"


@pytest.fixture(scope="module")
def open_private(upstream, tmp_path_factory) -> str:
    """A private repository alice may read and the mirror's rules allow."""
    repo = f"private/h9-open-{secrets.token_hex(3)}"
    fresh_image(upstream, tmp_path_factory.mktemp("scopes-image"), repo)
    return repo


@pytest.fixture(scope="module")
def scoped(upstream, second_upstream, tmp_path_factory):
    base = tmp_path_factory.mktemp("scopes-mirror")
    creds = base / "upstream-credentials"
    creds.write_text(f"ghcr.io alice {second_upstream.users['alice']}\n")
    os.chmod(creds, 0o600)
    env = {**WIDE_LOG, "HUB_UPSTREAM_CREDENTIALS_DOCKER_IO": f"alice:{upstream.users['alice']}"}
    args = table_args(upstream, second_upstream, f"hub_host_map={HOST_MAPPED}=ghcr.io",
                      f"hub_upstream_credentials={creds}", "hub_deny=docker.io/private/secret",
                      "hub_deny=ghcr.io/private/*")
    with Mirror(base / "m", upstream, extra_args=args, env=env) as m:
        yield m


def opens(up, token: str, repo: str, reference: str) -> int:
    """The status distribution itself (not the edge, not the mirror) answers for a manifest with ``token``."""
    r = httpx.get(f"{up.registry_url}/v2/{repo}/manifests/{reference}", timeout=15,
                  headers=[("Authorization", f"Bearer {token}"), *[("Accept", a) for a in INDEX_ACCEPT]])
    return r.status_code


def grants(r: httpx.Response) -> list[str]:
    """Every token in a token answer (``token`` and ``access_token`` may differ)."""
    assert r.status_code == 200, r.text
    doc = r.json()
    return list(dict.fromkeys(t for t in (doc.get("token"), doc.get("access_token")) if t))


def access_of(token: str) -> list:
    return decode_jwt_unverified(token)[1].get("access", [])


def space(sep: str, *scopes: str) -> str:
    return sep.join(scopes)


# GET query strings, sent as is (already encoded): case -> query
GET_CASES = {
    "%20 in one value": f"scope={quote(space(' ', ALLOWED, DENIED))}",
    "+ in one value": f"scope={quote(ALLOWED)}+{quote(DENIED)}",
    "raw + between": f"scope={ALLOWED}+{DENIED}",
    "repeated parameters": f"scope={quote(ALLOWED)}&scope={quote(DENIED)}",
    "denied first": f"scope={quote(space(' ', DENIED, ALLOWED))}",
    "tab": f"scope={quote(space(chr(9), ALLOWED, DENIED))}",
    "newline": f"scope={quote(space(chr(10), ALLOWED, DENIED))}",
    "CR LF": f"scope={quote(space(chr(13) + chr(10), ALLOWED, DENIED))}",
    "several spaces, leading and trailing": f"scope={quote('  ' + ALLOWED + '   ' + DENIED + ' ')}",
    "vertical tab and form feed": f"scope={quote(ALLOWED + chr(11) + DENIED + chr(12))}",
    "encoded separators": "scope=" + quote(ALLOWED, safe="") + "%20" + quote(DENIED, safe=""),
    "resource class": f"scope={quote(space(' ', ALLOWED, 'repository(plugin):private/secret:pull'))}",
    "registry name as prefix": f"scope={quote(space(' ', ALLOWED, 'repository:docker.io/private/secret:pull'))}",
    "more actions": f"scope={quote(space(' ', ALLOWED, 'repository:private/secret:pull,push,delete'))}",
    "wildcard action": f"scope={quote(space(' ', ALLOWED, 'repository:private/secret:*'))}",
    "semicolon": f"scope={quote(ALLOWED)};scope={quote(DENIED)}",
    "denied alone": f"scope={quote(DENIED)}",
}


# separators that no token service reads between two scopes: the allowed one need not work either
NOT_A_SEPARATOR = ("semicolon", "denied alone")


@pytest.mark.parametrize("path", ["/token", "/token/docker.io"])
@pytest.mark.parametrize("case", list(GET_CASES))
def test_get_token_never_opens_the_denied_repository(scoped, upstream, case, path):
    """A refusal (4xx) is fine too; a token must not open the denied repository."""
    r = httpx.get(f"{scoped.url}{path}?service={SERVICE}&{GET_CASES[case]}", timeout=15)
    if 400 <= r.status_code < 500:
        return  # refused: nothing to use anywhere
    for token in grants(r):
        status = opens(upstream, token, "private/secret", "1.0")
        assert status in (401, 403), f"{case}: the registry answered {status} with access {access_of(token)}"
        if case not in NOT_A_SEPARATOR:
            assert opens(upstream, token, "library/alpine", "3.19") == 200, f"{case}: {access_of(token)}"


POST_FORMS = {  # containerd's POST form; the scopes space-joined
    "containerd anonymous form": {"grant_type": "password", "client_id": "containerd-client",
                                  "access_type": "online", "service": SERVICE, "scope": f"{ALLOWED} {DENIED}"},
    "offline access": {"grant_type": "password", "client_id": "containerd-client", "access_type": "offline",
                       "service": SERVICE, "scope": f"{ALLOWED} {DENIED}"},
    "repeated scope fields": [("grant_type", "password"), ("client_id", "containerd-client"), ("service", SERVICE),
                              ("scope", ALLOWED), ("scope", DENIED)],
    "tab in the form": {"grant_type": "password", "client_id": "containerd-client", "service": SERVICE,
                        "scope": f"{ALLOWED}\t{DENIED}"},
}


@pytest.mark.parametrize("case", list(POST_FORMS))
def test_post_form_never_opens_the_denied_repository(scoped, upstream, case):
    r = httpx.post(f"{scoped.url}/token", content=urlencode(POST_FORMS[case]), timeout=15,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    for token in grants(r):
        status = opens(upstream, token, "private/secret", "1.0")
        assert status in (401, 403), f"{case}: the registry answered {status} with access {access_of(token)}"
        assert opens(upstream, token, "library/alpine", "3.19") == 200, f"{case}: {access_of(token)}"


def test_clients_own_credentials_do_not_lift_the_rule(scoped, upstream):
    """alice herself, through the mirror (Basic on GET, password in containerd's form):
    the rule is the operator's, and the token she gets there does not open the
    denied repository either."""
    password = upstream.users["alice"]
    answers = [
        httpx.get(f"{scoped.url}/token?service={SERVICE}&scope={quote(space(' ', ALLOWED, DENIED))}",
                  auth=("alice", password), timeout=15),
        httpx.post(f"{scoped.url}/token", timeout=15, data={
            "grant_type": "password", "username": "alice", "password": password, "client_id": "containerd-client",
            "service": SERVICE, "scope": f"{ALLOWED} {DENIED}"}),
    ]
    for r in answers:
        for token in grants(r):
            assert opens(upstream, token, "private/secret", "1.0") in (401, 403), access_of(token)


GHCR_CASES = {  # (path, Host header or None, query)
    "/token/ghcr.io": ("/token/ghcr.io", None,
                       f"scope={quote(space(' ', 'repository:owner/tool:pull', DENIED))}"),
    "path-prefixed scopes": ("/token", None,
                             f"scope={quote(space(' ', 'repository:ghcr.io/owner/tool:pull', 'repository:ghcr.io/private/secret:pull'))}"),
    "host name": ("/token", HOST_MAPPED, f"scope={quote(space(' ', 'repository:owner/tool:pull', DENIED))}"),
    "host name, repeated": ("/token", HOST_MAPPED,
                            f"scope={quote('repository:owner/tool:pull')}&scope={quote(DENIED)}"),
}


@pytest.mark.parametrize("case", list(GHCR_CASES))
def test_other_registry_never_opens_its_denied_repository(scoped, second_upstream, case):
    path, host, query = GHCR_CASES[case]
    r = httpx.get(f"{scoped.url}{path}?service={GHCR_SERVICE}&{query}", timeout=15,
                  headers={"Host": host} if host else None)
    for token in grants(r):
        status = opens(second_upstream, token, "private/secret", "1.0")
        assert status in (401, 403), f"{case}: ghcr's registry answered {status} with access {access_of(token)}"
        assert opens(second_upstream, token, "owner/tool", "1.0") == 200, f"{case}: {access_of(token)}"


def test_server_side_credentials_are_in_use(scoped, upstream, second_upstream, open_private):
    """Positive controls: through the mirror, an anonymous client's token opens a private
    repository alice may read and the rules allow (the credentials are in use, as
    alice), and the attack's scope string, asked of the token service directly as
    alice, opens the denied repository (what the mirror must prevent)."""
    before = len(upstream.token_requests())
    r = httpx.get(f"{scoped.url}/token", params={"service": SERVICE, "scope": f"repository:{open_private}:pull"},
                  timeout=15)
    token = grants(r)[0]
    assert opens(upstream, token, open_private, "1") == 200, access_of(token)
    assert any(rec.get("account") == "alice" for rec in upstream.token_requests(min_count=before + 1)[before:])
    direct = upstream.get_token([space(" ", ALLOWED, DENIED)], user="alice")
    assert opens(upstream, direct, "private/secret", "1.0") == 200
    ghcr = httpx.get(f"{scoped.url}/token/ghcr.io", params={"service": GHCR_SERVICE,
                                                            "scope": "repository:owner/tool:pull"}, timeout=15)
    assert decode_jwt_unverified(grants(ghcr)[0])[1]["sub"] == "alice"


def test_no_refresh_token_for_the_operators_account(scoped, upstream):
    """A token answer made with the server-side credentials must not carry a refresh
    token: it is the operator's account's own long-lived credential, and with it an
    anonymous client asks the token service directly (no mirror, no rules) for any
    scope, the denied repository's too. docker login asks for one exactly so:
    ``offline_token=true`` (GET) or ``access_type=offline`` (POST)."""
    answers = {
        "GET offline_token": httpx.get(f"{scoped.url}/token", timeout=15, params={
            "service": SERVICE, "scope": ALLOWED, "offline_token": "true", "client_id": "docker",
            "account": "alice"}),
        "POST access_type=offline": httpx.post(f"{scoped.url}/token", timeout=15, data={
            "grant_type": "password", "client_id": "containerd-client", "access_type": "offline",
            "service": SERVICE, "scope": ALLOWED}),
    }
    problems = []
    for case, r in answers.items():
        assert r.status_code == 200, r.text
        refresh = r.json().get("refresh_token")
        if not refresh:
            continue
        direct = httpx.post(upstream.token_realm, timeout=15, data={
            "grant_type": "refresh_token", "refresh_token": refresh, "service": SERVICE, "client_id": "anyone",
            "scope": DENIED})
        token = direct.json().get("token") if direct.status_code == 200 else None
        status = opens(upstream, token, "private/secret", "1.0") if token else direct.status_code
        problems.append(f"{case}: a refresh token for the operator's account; with it the token service "
                        f"gave a token the registry answers {status} for the denied repository")
    assert not problems, "\n".join(problems)


def test_read_only_mirror_gives_no_write_token(scoped, upstream, tmp_path):
    """A read-only mirror (hub_allow_push false) answers every push 405; its token
    endpoint must not hand an anonymous client a token that pushes upstream, with
    the operator's account, around it. Here the server-side account is alice, who
    may only pull, so the token service grants no push; the assertion on the scopes
    the mirror sent on is what shows the mirror's part."""
    before = len(upstream.token_requests())
    r = httpx.get(f"{scoped.url}/token", timeout=15, params={
        "service": SERVICE, "scope": "repository:team/h9-write:pull,push,delete"})
    grants(r)
    recs = upstream.token_requests(min_count=before + 1)[before:]
    asked = [scope for rec in recs for scope in rec.get("scopes_requested", [])]
    assert asked and all("push" not in s and "delete" not in s and "*" not in s.rsplit(":", 1)[-1] for s in asked), \
        f"the mirror asked the token service for write access with the operator's account: {asked}"

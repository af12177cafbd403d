"""The mirror's token endpoint, ``/token[/<registry>]``: the realm of every challenge it relays.

A token request goes on to the realm the upstream it is for announced itself,
never to one a client names, with the client's upstream credentials and no
other host's. Its scopes are parsed one by one as token services parse them
(repeated parameters, space-separated values, forms): each is renamed to the
upstream's repository name and dropped if the operator's rules refuse it, so a
token fetched through the mirror (perhaps with the operator's own upstream
account) never opens a refused repository. With mirror accounts, the mirror
part of the client's credentials is checked here and kept back.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from mitmproxy import http

from ..access.accounts import sign_in
from ..access.issued import OFFLINE, OWN, OWN_TOKEN_LIFETIME, Holder, is_sealed
from ..client_request import ClientRequest
from ..registry import headers as hdrs
from ..registry import tokens
from ..registry.errors import RegistryError
from ..registry.names import NAME_RE
from ..registry.scopes import Scope, map_scope_fields, repository_names
from ..registry.upstream import Upstream
from ..responses import STALE_HEADERS, error_response, make_response
from ..sources import UNAVAILABLE_STATUSES, first_answer
from .parts import TokenParts

log = logging.getLogger("hub_rewrite")

Fields = list[tuple[str, str]]


async def serve(request: ClientRequest, parts: TokenParts) -> http.Response:
    try:
        query = request.client_query
        form = tokens.parse_form(request.client_body) if request.method == "POST" else None
        named = request.path[len("/token") + 1:] or None
        request.upstream = request.registries.for_token(request.fixed, named, repository_names(query + (form or [])))
        request.summary.upstream = request.upstream.base
        authorization, holder, form = await _credentials(request, parts, form)
        asked = TokenRequest(request.method, query, form, authorization, holder)
        return await _at_sources(request, parts, asked)
    except RegistryError as e:
        if e.status == 401:
            return error_response(e, [("WWW-Authenticate", 'Basic realm="hub-rewrite"')])
        if e.status >= 500:
            e = RegistryError(e.status, e.code, f"cannot reach the upstream registry: {e.message}")
        return error_response(e)


@dataclass(frozen=True)
class TokenRequest:
    """A client's token request as the mirror sends it on (mirror accounts' part checked and dropped)."""

    method: str
    query: Fields
    form: Fields | None
    authorization: str | None
    holder: Holder | None

    @property
    def anonymous(self) -> bool:
        return self.authorization is None and not tokens.carries_credentials(self.form)


async def _at_sources(request: ClientRequest, parts: TokenParts, asked: TokenRequest) -> http.Response:
    """The token service of the first URL of the registry that answers (each URL announces its own);
    with none answering, a client without credentials gets an offline token (stale mode)."""
    try:
        source, answer = await first_answer(parts.upstreams.sources.of(request.upstream),
                                            lambda source: _at_source(request, parts, source, asked),
                                            lambda answer: answer.status_code)
    except RegistryError as e:
        lent = parts.upstreams.credentials.basic_for(request.upstream.name)  # the operator's account: not anonymous
        if parts.access is not None and asked.anonymous and not lent and e.status in UNAVAILABLE_STATUSES:
            log.warning("token request for %s: %s; an offline token", request.upstream.name, e.message)
            return _offline_token(parts, asked.holder)
        raise
    request.source = source
    return answer


async def _at_source(request: ClientRequest, parts: TokenParts, source: Upstream, asked: TokenRequest) -> http.Response:
    learned = await parts.upstreams.realms.discover(source, parts.upstreams.client)
    if learned is None:
        if asked.holder is not None:
            return _own_token(parts, asked.holder)
        raise RegistryError(404, "UNSUPPORTED", "the upstream registry does not use token authentication")
    realm, service = learned
    query = tokens.with_service(map_scope_fields(asked.query, _permitted_scopes(request, parts)), service)
    form = asked.form
    if form is not None:
        form = tokens.with_service(map_scope_fields(form, _permitted_scopes(request, parts)), service)
    return await _ask_token_service(request, parts, source, realm, replace(asked, query=query, form=form))


async def _credentials(
    request: ClientRequest, parts: TokenParts, form: Fields | None
) -> tuple[str | None, Holder | None, Fields | None]:
    """(the Authorization for the token service, the holder of the tokens to seal, the form):
    with mirror accounts, their part is checked and dropped."""
    authorization = request.client_authorization
    if parts.accounts is None:
        if any(k == "refresh_token" and is_sealed(v) for k, v in form or []):
            # another mirror's (this one has no accounts): not the token service's either
            raise RegistryError(401, "UNAUTHORIZED", "refresh token not issued by this mirror")
        return authorization, None, form
    holder, authorization, form = await sign_in(parts.accounts, parts.issued, authorization, form)
    return authorization, holder, form


def _permitted_scopes(request: ClientRequest, parts: TokenParts):
    """Client scope -> the upstream's, or None (dropped): another registry's prefix,
    a name outside the grammar, or a repository the rules refuse."""
    upstream: Upstream = request.upstream

    def mapped(scope: Scope) -> Scope | None:
        scope = request.registries.upstream_scope(upstream, scope)
        if not scope.is_repository:
            return scope
        if not NAME_RE.fullmatch(scope.name) or not parts.rules.permits(upstream.name, scope.name):
            return None
        return scope if parts.allow_push else scope.read_only()

    return mapped


async def _ask_token_service(request: ClientRequest, parts: TokenParts, source: Upstream, realm: str,
                             asked: TokenRequest) -> http.Response:
    """Raises RegistryError (502) when the token service gives no answer or a 5xx: the URL failed."""
    method, query, form, authorization, holder = (asked.method, asked.query, asked.form,
                                                  asked.authorization, asked.holder)
    if method == "POST" and form is not None and not tokens.carries_credentials(form):
        # a password grant whose password was only the mirror's: ask anonymously
        method, query, form = "GET", query + [(k, v) for k, v in form if k in ("service", "scope", "client_id")], None
    anonymous = authorization is None and not tokens.carries_credentials(form)
    if anonymous:
        authorization = parts.upstreams.credentials.basic_for_source(source)
    operators = anonymous and authorization is not None
    if operators:
        # the operator's account lends short-lived access tokens only, never its refresh token
        query = [(k, v) for k, v in query if k != "offline_token"]
    client_fields = hdrs.decode_fields(request.flow.request.headers.fields)
    headers = hdrs.without(tokens.token_request_headers(client_fields), ["authorization"])
    if authorization:
        headers.append(("Authorization", authorization))
    body = None
    if form is not None:
        body = tokens.encode_form(form)
        headers.append(("Content-Type", tokens.FORM_TYPE))
    host = urlsplit(realm).hostname
    try:
        # Not following redirects: the credentials go to this realm only.
        fetched = await parts.upstreams.client.fetch(method, tokens.realm_url(realm, query), headers, content=body,
                                            follow_redirects=False, purpose="token request to the token service")
    except RegistryError as e:
        raise RegistryError(e.status, e.code, f"token service at {host}: {e.message}") from e
    if fetched.status >= 500:
        raise RegistryError(502, "UNAVAILABLE", f"token service at {host} answered {fetched.status}")
    return _answer(parts, source, fetched, anonymous, operators, holder)


def _answer(parts: TokenParts, source: Upstream, fetched, anonymous: bool, operators: bool,
            holder: Holder | None) -> http.Response:
    """The token service's answer as the client gets it; its tokens noted as this URL's."""
    answer = fetched.body
    if operators and fetched.status == 200:
        answer = tokens.without_refresh_token(answer)
    grant = tokens.parse_grant(answer) if fetched.status == 200 else None
    if grant is not None:
        if parts.access is not None and anonymous and not operators:
            for token in grant.tokens:
                parts.access.note_anonymous_token(token)
        parts.upstreams.source_tokens.issued(grant.tokens, source, lendable=anonymous)
        if holder is not None:
            answer = parts.issued.sealed_grant(holder, grant, answer)
    answer_headers = hdrs.without(hdrs.end_to_end(fetched.headers), ["set-cookie", "location"])
    return make_response(fetched.status, answer_headers, answer)


def _own_token(parts: TokenParts, holder: Holder) -> http.Response:
    """Mirror accounts in front of an upstream without token auth: the mirror's
    own token, which opens the mirror and is never sent upstream."""
    return _token_answer(parts.issued.seal(OWN, holder, OWN_TOKEN_LIFETIME), OWN_TOKEN_LIFETIME)


def _offline_token(parts: TokenParts, holder: Holder | None) -> http.Response:
    """A token for a client without credentials while the token service is down.

    It is the mirror's own, worthless upstream, and opens only what anonymous
    clients were seen to pull within the stale window.
    """
    return _token_answer(parts.issued.seal(OFFLINE, holder, OWN_TOKEN_LIFETIME), OWN_TOKEN_LIFETIME, STALE_HEADERS)


def _token_answer(token: str, lifetime: float, headers: list[tuple[str, str]] = ()) -> http.Response:
    """A token the mirror made itself, shaped like a token service's answer."""
    body = json.dumps({"token": token, "access_token": token, "expires_in": int(lifetime),
                       "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
    return make_response(200, [("Content-Type", "application/json"), *headers], body)

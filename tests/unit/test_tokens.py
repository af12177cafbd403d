from urllib.parse import parse_qsl

import pytest

from hubrewrite.registry.errors import RegistryError as TokenRequestError
from hubrewrite.registry.names import official_name
from hubrewrite.registry.scopes import map_scope_fields, parse_scope, repository_names
from hubrewrite.registry.tokens import (
    carries_credentials,
    encode_form,
    parse_form,
    realm_url,
    token_request_headers,
)


def library(scope):
    return scope.renamed(official_name(scope.name, "library")) if scope.is_repository else scope


def rewrite_query(fields, mapper):
    return map_scope_fields(fields, mapper)


rewrite_form = rewrite_query
scope_names = repository_names


def test_get_query_keeps_repeated_scopes_and_rewrites_official_names():
    query = [
        ("service", "registry.docker.io"),
        ("scope", "repository:nginx:pull"),
        ("scope", "repository:bitnami/redis:pull"),
        ("offline_token", "true"),
        ("account", "alice"),
    ]
    assert rewrite_query(query, library) == [
        ("service", "registry.docker.io"),
        ("scope", "repository:library/nginx:pull"),
        ("scope", "repository:bitnami/redis:pull"),
        ("offline_token", "true"),
        ("account", "alice"),
    ]


def test_post_form_scopes_are_space_separated():
    body = b"grant_type=password&username=alice&password=p%26w&scope=repository%3Anginx%3Apull+repository%3Aa%2Fb%3Apull&client_id=docker"
    fields = parse_qsl(encode_form(rewrite_form(parse_form(body), library)).decode())
    assert ("scope", "repository:library/nginx:pull repository:a/b:pull") in fields
    assert ("password", "p&w") in fields
    assert ("grant_type", "password") in fields


def test_post_form_rejects_non_utf8():
    with pytest.raises(TokenRequestError):
        parse_form(b"scope=\xff")


def test_realm_url_appends_to_existing_query():
    assert realm_url("https://auth.example/token", [("service", "s")]) == "https://auth.example/token?service=s"
    assert realm_url("https://auth.example/token?x=1", [("scope", "repository:a:pull")]) == (
        "https://auth.example/token?x=1&scope=repository%3Aa%3Apull"
    )


def test_only_token_relevant_headers_are_forwarded():
    fields = [("Authorization", "Basic x"), ("Cookie", "c=1"), ("User-Agent", "docker"), ("X-Forwarded-For", "1.2.3.4")]
    assert token_request_headers(fields) == [("Authorization", "Basic x"), ("User-Agent", "docker")]


def test_scope_names_of_query_and_form():
    fields = [("scope", "repository:ghcr.io/owner/tool:pull registry:catalog:*"), ("scope", "repository:nginx:pull,push")]
    assert scope_names(fields) == ["ghcr.io/owner/tool", "nginx"]


def test_credentials_in_a_form():
    assert carries_credentials([("grant_type", "password"), ("password", "p")])
    assert carries_credentials([("refresh_token", "r")])
    assert not carries_credentials([("grant_type", "password"), ("username", "u")])
    assert not carries_credentials(None)


def deny_secret(scope):
    return None if scope.is_repository and scope.name.startswith("private/") else scope


@pytest.mark.parametrize("fields", [
    [("scope", "repository:library/alpine:pull repository:private/secret:pull")],  # space, as Docker Hub splits
    [("scope", "repository:library/alpine:pull\trepository:private/secret:pull")],  # any whitespace
    [("scope", "repository:library/alpine:pull"), ("scope", "repository:private/secret:pull")],  # repeated
    [("scope", "  repository:private/secret:pull  repository:library/alpine:pull ")],
])
def test_every_scope_of_every_syntax_is_checked_on_its_own(fields):
    kept = map_scope_fields(fields, deny_secret)
    assert "private/secret" not in " ".join(v for _, v in kept)
    assert ("scope", "repository:library/alpine:pull") in kept
    assert sorted(repository_names(fields)) == ["library/alpine", "private/secret"]


def test_plus_in_a_query_or_form_is_a_space():
    for fields in (parse_qsl("scope=repository:library/alpine:pull+repository:private/secret:pull"),
                   parse_form(b"scope=repository%3Alibrary%2Falpine%3Apull+repository%3Aprivate%2Fsecret%3Apull")):
        assert map_scope_fields(fields, deny_secret) == [("scope", "repository:library/alpine:pull")]


def test_scopes_outside_the_grammar_are_dropped_not_passed_on():
    assert map_scope_fields([("scope", "repository:a:pull,push garbage Repository:x:pull repository::pull")],
                            lambda s: s) == [("scope", "repository:a:pull,push")]
    assert parse_scope("repository:localhost:5000/app:pull").name == "localhost:5000/app"
    assert parse_scope("repository(plugin):x:pull").is_repository
    assert not parse_scope("registry:catalog:*").is_repository

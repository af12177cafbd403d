from urllib.parse import parse_qsl

import pytest

from hubrewrite.names import map_scope, official_name
from hubrewrite.tokens import (
    TokenRequestError,
    carries_credentials,
    encode_form,
    parse_form,
    realm_url,
    rewrite_form,
    rewrite_query,
    scope_names,
    token_request_headers,
)


def library(scope: str) -> str:
    return map_scope(scope, lambda name: official_name(name, "library"))


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

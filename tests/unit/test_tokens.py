from urllib.parse import parse_qsl

import pytest

from hubrewrite.tokens import TokenRequestError, realm_url, rewrite_form, rewrite_query, token_request_headers


def test_get_query_keeps_repeated_scopes_and_rewrites_official_names():
    query = [
        ("service", "registry.docker.io"),
        ("scope", "repository:nginx:pull"),
        ("scope", "repository:bitnami/redis:pull"),
        ("offline_token", "true"),
        ("account", "alice"),
    ]
    assert rewrite_query(query, "library") == [
        ("service", "registry.docker.io"),
        ("scope", "repository:library/nginx:pull"),
        ("scope", "repository:bitnami/redis:pull"),
        ("offline_token", "true"),
        ("account", "alice"),
    ]


def test_post_form_scopes_are_space_separated():
    body = b"grant_type=password&username=alice&password=p%26w&scope=repository%3Anginx%3Apull+repository%3Aa%2Fb%3Apull&client_id=docker"
    fields = parse_qsl(rewrite_form(body, "library").decode())
    assert ("scope", "repository:library/nginx:pull repository:a/b:pull") in fields
    assert ("password", "p&w") in fields
    assert ("grant_type", "password") in fields


def test_post_form_rejects_non_utf8():
    with pytest.raises(TokenRequestError):
        rewrite_form(b"scope=\xff", "library")


def test_realm_url_appends_to_existing_query():
    assert realm_url("https://auth.example/token", [("service", "s")]) == "https://auth.example/token?service=s"
    assert realm_url("https://auth.example/token?x=1", [("scope", "repository:a:pull")]) == (
        "https://auth.example/token?x=1&scope=repository%3Aa%3Apull"
    )


def test_only_token_relevant_headers_are_forwarded():
    fields = [("Authorization", "Basic x"), ("Cookie", "c=1"), ("User-Agent", "docker"), ("X-Forwarded-For", "1.2.3.4")]
    assert token_request_headers(fields) == [("Authorization", "Basic x"), ("User-Agent", "docker")]

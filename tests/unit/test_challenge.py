import pytest

from hubrewrite.registry.challenge import Challenge, ChallengeError, format_challenges, parse_challenges


def test_docker_hub_repository_challenge():
    value = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/nginx:pull",error="insufficient_scope"'
    )
    [c] = parse_challenges(value)
    assert c.is_bearer
    assert c.get("realm") == "https://auth.docker.io/token"
    assert c.get("SERVICE") == "registry.docker.io"
    assert c.get("scope") == "repository:library/nginx:pull"
    assert c.get("error") == "insufficient_scope"


def test_realm_replaced_in_place_other_params_kept():
    [c] = parse_challenges('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull,push"')
    out = c.with_param("realm", "http://127.0.0.1:5000/token").format()
    assert out == 'Bearer realm="http://127.0.0.1:5000/token",service="registry.docker.io",scope="repository:a/b:pull,push"'


def test_several_challenges_and_token_values():
    cs = parse_challenges('Basic realm="x", Bearer realm="https://a.example/t", service=svc')
    assert [c.scheme for c in cs] == ["Basic", "Bearer"]
    assert cs[1].get("realm") == "https://a.example/t"
    assert cs[1].get("service") == "svc"


def test_quoted_escapes_round_trip():
    [c] = parse_challenges(r'Bearer realm="a\"b",error="x\\y"')
    assert c.get("realm") == 'a"b'
    assert c.get("error") == "x\\y"
    assert parse_challenges(c.format())[0].params == c.params


def test_token68_and_bare_scheme():
    assert parse_challenges("Negotiate abc123==")[0].token68 == "abc123=="
    assert parse_challenges("Bearer")[0].params == {}
    assert format_challenges([Challenge("Bearer")]) == "Bearer"


@pytest.mark.parametrize("bad", ['Bearer realm="unterminated', "Bearer =x", '"quoted"'])
def test_malformed(bad):
    with pytest.raises(ChallengeError):
        parse_challenges(bad)

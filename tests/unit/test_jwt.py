import base64
import json
from pathlib import Path

import pytest

from hubrewrite.registry import jwt

NOT_UTF8 = b"\xff\xfe"
TOKEN = json.loads((Path(__file__).parent / "payloads" / "token_answer_get.json").read_text())["token"]


def b64(value) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_decodes_a_recorded_registry_token():
    decoded = jwt.decode(TOKEN)
    assert decoded.header["alg"] == "RS256" and decoded.header["typ"] == "JWT"
    assert decoded.claims["sub"] == "alice" and decoded.claims["aud"] == "registry.docker.io"
    assert decoded.expires_at == decoded.claims["exp"] == decoded.claims["iat"] + 300


def test_unsigned_jws_and_float_or_huge_exp():
    decoded = jwt.decode(f"{b64({'alg': 'none'})}.{b64({'exp': 1700000000.5})}.")
    assert decoded is not None and decoded.expires_at == 1700000000
    assert jwt.decode(f"{b64({'alg': 'none'})}.{b64({'exp': 10**400})}.").expires_at == 10**400


@pytest.mark.parametrize("exp", [None, "1700000000", True, [1], float("inf"), float("nan")])
def test_expires_at_is_none_without_a_numeric_exp(exp):
    claims = {} if exp is None else {"exp": exp}
    assert jwt.decode(f"{b64({'alg': 'RS256'})}.{b64(claims)}.c2ln").expires_at is None


@pytest.mark.parametrize("token", [
    "", "abc", "a.b", "a.b.c.d", TOKEN + ".x",
    f"{b64({'typ': 'JWT'})}.{b64({})}.c2ln",                # no alg
    f"{b64({'alg': 7})}.{b64({})}.c2ln",                   # alg not a string
    f"{b64({'alg': 'RS256'})}.{b64([1, 2])}.c2ln",         # claims not an object
    f"{b64({'alg': 'RS256'})}.{b64(b'not json')}.c2ln",
    f"{b64({'alg': 'RS256'})}.{b64(NOT_UTF8)}.c2ln",       # not UTF-8
    f"{b64({'alg': 'RS256'})}=.{b64({})}.c2ln",            # padding is not base64url
    f"{b64({'alg': 'RS256'})}.{b64({})}.c2ln+/",           # standard base64 alphabet
    f"{b64({'alg': 'RS256'})}.{b64(b'[' * 100000)}.c2ln",  # deeply nested
    None, 12, b"bytes.are.not",
])
def test_anything_else_is_none(token):
    assert jwt.decode(token) is None

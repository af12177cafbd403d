import base64
import re

import pytest

from hubrewrite.debug.fingerprint import fingerprint
from tests.support.auth import basic

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl"
DIGEST = r"<hmac:[0-9a-f]{12}>"


def test_kinds():
    assert re.fullmatch(rf"Bearer {DIGEST}", fingerprint(f"Bearer {JWT}"))
    assert re.fullmatch(rf"Basic user=alice {DIGEST}", fingerprint(basic("alice", "s3cret-pw")))
    assert re.fullmatch(rf"JWT {DIGEST}", fingerprint(JWT))
    assert re.fullmatch(DIGEST, fingerprint("some-opaque-refresh-token"))
    assert fingerprint("") == "<empty>"


def test_same_credential_same_digits_in_every_form():
    """A token in a token answer and in the Authorization header that carries it match."""
    digits = fingerprint(JWT).split()[-1]
    assert fingerprint(f"Bearer {JWT}").split()[-1] == digits
    assert fingerprint(f"bearer  {JWT} ").split()[-1] == digits
    assert fingerprint(JWT.encode()) == fingerprint(JWT)
    assert fingerprint("token-a") != fingerprint("token-b")


@pytest.mark.parametrize("secret", [basic("alice", "s3cret-pw"), f"Bearer {JWT}", JWT, "hunter2-opaque"])
def test_never_shows_the_secret_or_a_piece_of_it(secret):
    shown = fingerprint(secret)
    for piece in ["s3cret-pw", secret.split()[-1], *JWT.split("."), "hunter2"]:
        assert piece not in shown


@pytest.mark.parametrize("user", ["ali\nce", "x" * 65, ""])
def test_a_basic_user_name_that_is_not_plain_text_is_left_out(user):
    assert re.fullmatch(rf"Basic {DIGEST}", fingerprint(basic(user, "pw")))


def test_basic_that_is_not_base64_or_has_no_colon():
    assert re.fullmatch(rf"Basic {DIGEST}", fingerprint("Basic not*base64"))
    assert re.fullmatch(rf"Basic {DIGEST}", fingerprint("Basic " + base64.b64encode(b"alice").decode()))

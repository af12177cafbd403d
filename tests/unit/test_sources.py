"""Several URLs per registry (hubrewrite/sources.py): the table, the order, the back-off, the outage."""

import asyncio

import pytest

from hubrewrite.access.credentials import UpstreamCredentials, source_key
from hubrewrite.access.rules import PolicyError
from hubrewrite.registry.errors import RegistryError
from hubrewrite.registry.registries import TableError, parse_table, parse_upstream
from hubrewrite.sources import MAX_BACKOFF_FACTOR, SourceList, Sources, first_answer, source_of

TWO = "docker.io=https://registry-1.docker.io,https://mirror.example.org:8443"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_lists_several_urls_in_order():
    upstream = parse_upstream(TWO)
    assert upstream.base == "https://registry-1.docker.io"  # the first names the registry in the cache
    assert upstream.bases == ("https://registry-1.docker.io", "https://mirror.example.org:8443")
    assert upstream == parse_upstream("docker.io=https://registry-1.docker.io")  # the same registry
    assert parse_upstream(" docker.io = https://a.example , http://b.example:5000 ").bases == (
        "https://a.example", "http://b.example:5000")


@pytest.mark.parametrize("entry", [
    "docker.io=https://a.example,", "docker.io=https://a.example,ftp://b", "docker.io=https://a.example,https://b/p",
    "docker.io=https://a.example,https://a.example:443", "docker.io=,https://a.example",
])
def test_bad_lists_are_refused_with_the_entry_named(entry):
    with pytest.raises(TableError) as refused:
        parse_table([entry])
    assert repr(entry) in str(refused.value)


def test_first_healthy_url_then_back_off_then_tried_again():
    clock = Clock()
    sources = SourceList(parse_upstream(TWO), backoff=10, clock=clock)
    first, second = sources.sources
    assert sources.candidates() == [first, second] and first.name == second.name == "docker.io"
    assert (second.host, second.port, second.others) == ("mirror.example.org", 8443, ())
    sources.failed(first, "connection refused")
    assert sources.candidates() == [second] and sources.unreachable_since is None
    assert sources.next_source() == second and sources.next_source([second.base]) is None
    clock.now += 10
    assert sources.candidates() == [first, second]  # tried again after its back-off
    sources.failed(first, "again")  # a second failure in a row: twice as long
    clock.now += 19
    assert sources.candidates() == [second]
    clock.now += 1
    assert sources.candidates() == [first, second]
    for _ in range(10):
        sources.failed(first, "and again")
    assert sources.state()[0][2] == 10 * MAX_BACKOFF_FACTOR  # bounded
    sources.answered(first)
    assert sources.state()[0][:2] == (first.base, True)


def test_every_url_failing_is_an_outage_until_one_answers():
    clock = Clock()
    sources = SourceList(parse_upstream(TWO), backoff=5, clock=clock)
    first, second = sources.sources
    sources.note_stale("manifest")  # not during an outage: not counted
    sources.failed(first, "refused")
    sources.failed(second, "answered 503")
    assert sources.unreachable_since is not None
    assert sources.candidates() == [first]  # every URL backing off: the one whose back-off ends first is tried
    clock.now += 1
    sources.failed(first, "refused")  # a second failure: its back-off is longer now
    assert sources.candidates() == [second]
    sources.note_stale("manifest")
    sources.note_stale("blob")
    sources.note_stale("blob")
    assert sources.stale_served == {"manifest": 1, "blob": 2}
    clock.now += 5
    sources.answered(second)
    assert sources.unreachable_since is None
    assert [healthy for _, healthy, _, _ in sources.state()] == [False, True]


def run(coroutine):
    return asyncio.run(coroutine)


def test_first_answer_skips_failing_urls_and_says_which_answered():
    sources = SourceList(parse_upstream(TWO), backoff=30, clock=Clock())
    asked = []

    async def attempt(source):
        asked.append(source.base)
        if source.base == "https://registry-1.docker.io":
            raise RegistryError(502, "UNAVAILABLE", "upstream unreachable")
        return 200

    source, answer = run(first_answer(sources, attempt, lambda status: status))
    assert (source.base, answer) == ("https://mirror.example.org:8443", 200)
    asked.clear()
    run(first_answer(sources, attempt, lambda status: status))
    assert asked == ["https://mirror.example.org:8443"]  # the first is backing off: not asked


def answering_with(status: int):
    async def attempt(source):
        return status
    return attempt


@pytest.mark.parametrize("status", [429, 500, 503])
def test_a_failing_status_moves_on_and_the_last_answer_is_returned(status):
    sources = SourceList(parse_upstream(TWO), backoff=30, clock=Clock())
    attempt = answering_with(status)
    source, answer = run(first_answer(sources, attempt, lambda s: s))
    assert (source.base, answer) == ("https://mirror.example.org:8443", status)  # the caller's stale mode decides
    assert sources.unreachable_since is not None
    source, answer = run(first_answer(sources, attempt, lambda s: s))  # backing off, both: one is still asked
    assert (source.base, answer) == ("https://registry-1.docker.io", status)


@pytest.mark.parametrize("status", [200, 401, 404])
def test_an_answer_is_an_answer(status):
    sources = SourceList(parse_upstream(TWO), backoff=30, clock=Clock())
    source, answer = run(first_answer(sources, answering_with(status), lambda s: s))
    assert (source.base, answer) == ("https://registry-1.docker.io", status)


def test_other_errors_are_not_failures_of_the_url():
    sources = SourceList(parse_upstream(TWO), backoff=30, clock=Clock())

    async def attempt(source):
        raise RegistryError(414, "UNSUPPORTED", "too long")

    with pytest.raises(RegistryError):
        run(first_answer(sources, attempt))
    assert all(healthy for _, healthy, _, _ in sources.state())


def test_health_survives_a_new_table_that_lists_the_same_urls():
    old = Sources(parse_table([TWO, "ghcr.io"]), 30)
    docker = old.of(parse_upstream(TWO))
    docker.failed(docker.sources[0], "refused")
    new = Sources(parse_table([TWO, "ghcr.io"]), 60).kept_from(old)
    assert new.of(parse_upstream(TWO)) is docker and docker.backoff == 60
    changed = Sources(parse_table(["docker.io=https://registry-1.docker.io"]), 30).kept_from(old)
    assert changed.of(parse_upstream("docker.io=https://registry-1.docker.io")) is not docker
    assert new.of(parse_upstream(TWO)).next_source().base == "https://mirror.example.org:8443"


def test_server_side_credentials_per_url(tmp_path):
    upstream = parse_upstream(TWO)
    first, second = (source_of(upstream, base) for base in upstream.bases)
    assert (source_key(first), source_key(second)) == ("registry-1.docker.io", "mirror.example.org:8443")
    creds = tmp_path / "creds"
    creds.write_text("docker.io hub secret1\nmirror.example.org:8443 other secret2\n")
    known = {"docker.io", source_key(first), source_key(second)}
    loaded = UpstreamCredentials.load(str(creds), known, environ={})
    assert loaded.basic_for_source(first) == loaded.basic_for("docker.io")  # the registry's account
    assert loaded.basic_for_source(second) == loaded.basic_for("mirror.example.org:8443") != loaded.basic_for_source(first)
    creds.write_text("elsewhere.example user secret\n")
    with pytest.raises(PolicyError):
        UpstreamCredentials.load(str(creds), known, environ={})

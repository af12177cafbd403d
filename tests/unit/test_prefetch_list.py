"""The prefetch list (hub_prefetch, prefetch/listfile.py): its grammar, where each image is
fetched from (the upstream table, a reverse listener's target), what the rules refuse, and the
one line a malformed list stops the mirror with."""

from __future__ import annotations

import pytest
from mitmproxy import exceptions

from hubrewrite.access.rules import RepositoryRules
from hubrewrite.prefetch.listfile import Platform, prefetch_settings
from hubrewrite.registry.registries import DEFAULT_UPSTREAMS, Registries, parse_table

TABLE = Registries(parse_table(list(DEFAULT_UPSTREAMS)), "docker.io")
OPEN = RepositoryRules.parse([], [])
DIGEST = "sha256:" + "ab" * 32


def read(tmp_path, text: str, rules: RepositoryRules = OPEN, modes=("regular",), interval: int = 60):
    path = tmp_path / "prefetch.txt"
    path.write_text(text)
    return prefetch_settings(str(path), interval, str(tmp_path / "cache"), list(modes), TABLE, rules)


def test_references_are_named_as_clients_name_them(tmp_path):
    settings = read(tmp_path, f"""
        # comments and blank lines

        docker.io/library/nginx:1.27 linux/amd64,linux/arm64/v8
        alpine            # Docker Hub's official image, latest
        ghcr.io/owner/tool@{DIGEST}
        quay.io/org/app:v1 linux/amd64,linux/amd64
    """)
    shown = [(i.name, i.upstream.base, tuple(map(str, i.platforms)), i.refused) for i in settings.images]
    assert shown == [
        ("docker.io/library/nginx:1.27", "https://registry-1.docker.io", ("linux/amd64", "linux/arm64/v8"), ""),
        ("docker.io/library/alpine:latest", "https://registry-1.docker.io", (), ""),
        (f"ghcr.io/owner/tool@{DIGEST}", "https://ghcr.io", (), ""),
        ("quay.io/org/app:v1", "https://quay.io", ("linux/amd64",), ""),
    ]
    assert settings.interval == 60 and settings.lock_name.startswith("prefetch-")


def test_a_reverse_listeners_target_is_the_default_registrys_api(tmp_path):
    settings = read(tmp_path, "nginx\n", modes=["reverse:https://127.0.0.1:8443@5001"])
    assert settings.images[0].upstream.base == "https://127.0.0.1:8443"
    assert settings.images[0].name == "docker.io/library/nginx:latest"


def test_what_the_table_or_the_rules_refuse_is_kept_as_refused(tmp_path):
    rules = RepositoryRules.parse([], ["docker.io/private/*"])
    settings = read(tmp_path, "private/secret:1\nregistry.example.org/team/app:1\nteam/app:1\n", rules)
    assert [i.refused for i in settings.images] == [
        "refused by hub_allow/hub_deny", "this mirror does not serve registry registry.example.org", ""]


def test_no_list_no_settings(tmp_path):
    assert prefetch_settings("", 60, "", [], TABLE, OPEN) is None


@pytest.mark.parametrize("text,message", [
    ("Nginx\n", "prefetch.txt:1: 'Nginx' is not an image reference"),
    ("nginx\nnginx:bad!tag\n", "prefetch.txt:2: 'nginx:bad!tag': 'bad!tag' is not a valid tag"),
    ("nginx@sha256:12\n", "invalid sha256 digest"),
    ("nginx linux/amd64 extra\n", "expected an image reference and at most a platform list"),
    ("nginx linux\n", "'linux' is not a platform"),
    ("nginx linux/amd64,\n", "'' is not a platform"),
    ("nginx\ndocker.io/library/nginx:latest\n", "prefetch.txt:2: docker.io/library/nginx:latest is listed on line 1"),
    ("team/-app:1\n", "'team/-app:1': 'team/-app' is not a repository name"),
    ("/nginx\n", "is not an image reference"),
])
def test_a_malformed_list_is_one_options_error_naming_its_line(tmp_path, text, message):
    with pytest.raises(exceptions.OptionsError) as raised:
        read(tmp_path, text)
    assert str(raised.value).startswith("hub_prefetch: ") and message in str(raised.value)


def test_a_list_needs_the_cache_a_readable_file_and_an_interval(tmp_path):
    with pytest.raises(exceptions.OptionsError, match="needs hub_cache_dir"):
        prefetch_settings(str(tmp_path / "x"), 60, "", [], TABLE, OPEN)
    with pytest.raises(exceptions.OptionsError, match="at least 1 second"):
        read(tmp_path, "nginx\n", interval=0)
    with pytest.raises(exceptions.OptionsError, match="cannot read"):
        prefetch_settings(str(tmp_path / "missing.txt"), 60, str(tmp_path), [], TABLE, OPEN)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(exceptions.OptionsError, match="not UTF-8"):
        prefetch_settings(str(tmp_path / "binary.txt"), 60, str(tmp_path), [], TABLE, OPEN)


@pytest.mark.parametrize("platform,entry,matches", [
    (Platform("linux", "arm64"), {"os": "linux", "architecture": "arm64", "variant": "v8"}, True),
    (Platform("linux", "arm64", "v8"), {"os": "linux", "architecture": "arm64", "variant": "v8"}, True),
    (Platform("linux", "arm", "v7"), {"os": "linux", "architecture": "arm", "variant": "v6"}, False),
    (Platform("linux", "amd64"), {"os": "windows", "architecture": "amd64"}, False),
    (Platform("linux", "amd64"), None, False),
])
def test_platforms_match_an_index_entry(platform, entry, matches):
    assert platform.matches(entry) is matches

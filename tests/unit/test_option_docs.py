"""The options as people read them agree with the options the code declares.

``settings.OPTIONS`` is where each ``hub_*`` option is declared (name, type,
default, help). Three texts repeat part of it, and are checked here:

* the README's options table: one row per option, its default as declared;
* ``mitm.conf``: a ``hub_*`` key there is a declared option, shown at its
  declared default so that an operator sees and edits it, unless the comment
  above it says why it differs in a line beginning ``Not the default:``; every
  other key (mitmproxy's options the mirror sets) and every such ``hub_*`` key
  has a row, with the same value, in docs/service.md's table of what mitm.conf
  sets (the README links it);
* the README's list of the registries served by default (``hub_upstreams``).
"""

from __future__ import annotations

import functools
import ipaddress
import re

import pytest

from hubrewrite.config_file import read_config
from hubrewrite.registry.registries import DEFAULT_UPSTREAMS, parse_table
from hubrewrite.config_file import DEFAULT_CONFIG, REPO_ROOT
from hubrewrite.settings import OPTIONS

DECLARED = {option.name: option for option in OPTIONS}
NOT_THE_DEFAULT = "Not the default:"
NUMBER_WORDS = dict(enumerate("zero one two three four five six seven eight nine ten eleven twelve".split()))

# The README's words for kinds of network, in hub_private_networks' default cell.
NETWORK_WORDS = {
    "loopback": ("127.0.0.0/8", "::1/128"),
    "RFC 1918": ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"),
    "link-local": ("169.254.0.0/16", "fe80::/10"),
    "ULA": ("fc00::/7",),
}


@functools.cache
def readme() -> str:
    return (REPO_ROOT / "README.md").read_text()


@functools.cache
def service_doc() -> str:
    return (REPO_ROOT / "docs" / "service.md").read_text()


def section(markdown: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split()[0]
    start = markdown.index(f"\n{heading}\n")
    ends = [m.start() for m in re.finditer(r"^#{1,%d} " % len(level), markdown[start + 1:], re.M)]
    return markdown[start + 1:][: ends[1] if len(ends) > 1 else None]


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header row is ``header``."""
    lines = text[text.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def code_names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def readme_defaults() -> dict[str, str]:
    rows = table_rows(section(readme(), "## Options"), "| option | default | meaning |")
    defaults = {}
    for names, default, meaning in rows:
        assert meaning, f"{names} has no meaning in the README's options table"
        for name in code_names(names):
            assert name not in defaults, f"{name} has two rows in the README's options table"
            defaults[name] = default
    return defaults


def as_readme_shows(value: object) -> str:
    """A default the way the README's tables write it."""
    if value in ("", [], (), None):
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def described_default(name: str, default: object, cell: str) -> bool:
    """Defaults the README puts in words: do the words say the declared value?"""
    if name == "hub_config":
        return default == str(REPO_ROOT / "mitm.conf") and cell == "`<repo>/mitm.conf`"
    if name == "hub_upstreams":  # the list itself is checked against the section it points to
        return list(default) == list(DEFAULT_UPSTREAMS) and cell == f"the {NUMBER_WORDS[len(default)]} above"
    if name == "hub_private_networks":
        words = [word.strip() for word in cell.split(",")]
        if not set(words) <= set(NETWORK_WORDS):
            return False
        named = {ipaddress.ip_network(n) for word in words for n in NETWORK_WORDS[word]}
        return named == {ipaddress.ip_network(n) for n in default}
    return False


def test_every_option_has_help_and_a_readme_row_with_its_default():
    shown = readme_defaults()
    assert sorted(set(shown) - set(DECLARED)) == [], "README rows for options that are not declared"
    assert sorted(set(DECLARED) - set(shown)) == [], "declared options without a README row"
    wrong = {}
    for name, option in DECLARED.items():
        assert option.help.strip(), f"{name} has no help"
        cell = shown[name]
        if cell != as_readme_shows(option.default) and not described_default(name, option.default, cell):
            wrong[name] = f"README says {cell}, declared {option.default!r}"
    assert wrong == {}


def conf_comments() -> dict[str, list[str]]:
    """mitm.conf's top-level keys -> the comment lines right above each."""
    comments: dict[str, list[str]] = {}
    block: list[str] = []
    for line in DEFAULT_CONFIG.read_text().splitlines():
        if line.startswith("#"):
            block.append(line.lstrip("#").strip())
        elif match := re.match(r"([a-z0-9_]+):", line):
            comments[match[1]] = block
            block = []
        elif not line.strip():
            block = []
    return comments


def test_mitm_conf_hub_keys_are_declared_and_at_their_default_unless_it_says_why():
    conf = read_config(DEFAULT_CONFIG)
    comments = conf_comments()
    assert sorted(comments) == sorted(conf), "conf_comments() misread mitm.conf"
    hub_keys = [key for key in conf if key.startswith("hub_")]
    assert sorted(set(hub_keys) - set(DECLARED)) == [], "mitm.conf sets hub_* options that are not declared"
    unexplained = {key: f"{conf[key]!r} is not the default {DECLARED[key].default!r}" for key in hub_keys
                   if conf[key] != DECLARED[key].default
                   and not any(line.startswith(NOT_THE_DEFAULT) for line in comments[key])}
    assert unexplained == {}, f"say why in a comment line beginning {NOT_THE_DEFAULT!r}, or use the default"


def test_service_doc_lists_what_mitm_conf_sets():
    conf = read_config(DEFAULT_CONFIG)
    comments = conf_comments()
    sets = {key: value for key, value in conf.items()
            if not key.startswith("hub_") or any(line.startswith(NOT_THE_DEFAULT) for line in comments[key])}
    rows = table_rows(section(service_doc(), "## Options and `mitm.conf`"), "| option | in mitm.conf | why |")
    listed = {code_names(name)[0]: value for name, value, why in rows if why}
    assert len(listed) == len(rows), "a row without a why"
    assert listed == {key: as_readme_shows(value) for key, value in sets.items()}
    assert all(comments[key] for key in sets), "every key mitm.conf sets has a comment saying why"


def test_readme_names_the_default_registries():
    text = section(readme(), "## One mirror for several registries")
    sentence = text[text.index("by default"): text.index("Add one as")]
    expected = []
    for upstream in parse_table(list(DEFAULT_UPSTREAMS)).values():
        expected.append(upstream.name)
        if upstream.host != upstream.name:
            expected.append(upstream.host)  # "API at `host`"
    assert code_names(sentence) == expected


def test_readme_opening_names_the_registries_besides_docker_hub():
    text = readme()
    opening = text[: text.index("\n\n", text.index("addon; it also serves"))]
    listed = re.search(r"it also serves (.*?) from the same address", " ".join(opening.split()))[1]
    others = [name for name in parse_table(list(DEFAULT_UPSTREAMS)) if name != "docker.io"]
    assert re.split(r", | and ", listed) == others


@pytest.mark.parametrize("cell,ok", [("loopback, RFC 1918, link-local, ULA", True), ("loopback, RFC 1918", False),
                                     ("loopback, RFC 1918, link-local, ULA, CGNAT", False)])
def test_network_words_are_read_strictly(cell, ok):
    assert described_default("hub_private_networks", DECLARED["hub_private_networks"].default, cell) is ok

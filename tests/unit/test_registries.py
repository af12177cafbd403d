import pytest

from hubrewrite.registry.errors import RegistryError as RouteError
from hubrewrite.registry.registries import (
    DEFAULT_UPSTREAMS,
    Registries,
    TableError,
    hostname_of,
    parse_host_map,
    parse_table,
    parse_upstream,
)
from hubrewrite.registry.upstream import Upstream
from hubrewrite.registry.scopes import parse_scope


def table(*entries: str) -> Registries:
    parsed = parse_table(list(entries))
    return Registries(parsed, "docker.io", parse_host_map(["ghcr.mirror.test=ghcr.io"], set(parsed)))


def test_default_table_has_docker_hub_api_host_and_the_big_registries():
    parsed = parse_table(list(DEFAULT_UPSTREAMS))
    assert parsed["docker.io"] == Upstream("https", "registry-1.docker.io", 443, "docker.io")
    assert parsed["ghcr.io"].base == "https://ghcr.io"
    assert set(parsed) == {"docker.io", "ghcr.io", "quay.io", "gcr.io", "registry.k8s.io", "nvcr.io", "mcr.microsoft.com"}


@pytest.mark.parametrize("entry", [
    "https://ghcr.io", "ghcr.io=ftp://x", "ghcr.io=https://x/path", "ghcr.io=https://u:p@x", "bad name", "x=https://h:99999",
])
def test_bad_entries_are_refused(entry):
    with pytest.raises(TableError):
        parse_upstream(entry)


def test_duplicates_and_unknown_host_map_targets_are_refused():
    with pytest.raises(TableError):
        parse_table(["ghcr.io", "ghcr.io=https://x"])
    with pytest.raises(TableError):
        parse_host_map(["q.example=quay.io"], {"ghcr.io"})
    with pytest.raises(TableError):
        parse_host_map(["q.example:5000=ghcr.io"], {"ghcr.io"})


def test_ns_names_a_table_registry_or_its_api_host():
    r = table("docker.io=https://registry-1.docker.io", "ghcr.io")
    assert r.by_ns([]) is None
    assert r.by_ns(["ghcr.io"]).name == "ghcr.io"
    assert r.by_ns(["registry-1.docker.io"]).name == "docker.io"
    with pytest.raises(RouteError) as e:
        r.by_ns(["evil.test"])
    assert (e.value.status, e.value.code) == (404, "NAME_UNKNOWN")
    with pytest.raises(RouteError) as e:
        r.by_ns(["http://x/"])
    assert e.value.code == "NAME_INVALID"
    with pytest.raises(RouteError):
        r.by_ns(["ghcr.io", "docker.io"])


def test_path_prefix_routing_and_default():
    r = table("docker.io=https://registry-1.docker.io", "ghcr.io")
    routed = r.route(None, "ghcr.io/owner/img")
    assert (routed.upstream.name, routed.name, routed.client_prefix) == ("ghcr.io", "owner/img", "ghcr.io/")
    assert routed.client_name("owner/img") == "ghcr.io/owner/img"
    routed = r.route(None, "library/nginx")
    assert (routed.upstream.name, routed.name, routed.client_prefix) == ("docker.io", "library/nginx", "")
    with pytest.raises(RouteError) as e:
        r.route(None, "evil.test/x")
    assert e.value.code == "NAME_UNKNOWN"
    # decided by ns or host already: the name is the upstream's own (gcr.io/google.com/project)
    assert r.route(r.table["ghcr.io"], "google.com/x").name == "google.com/x"


def test_host_map_and_proxy_targets():
    r = table("docker.io=https://registry-1.docker.io", "ghcr.io")
    assert r.for_client_host("GHCR.mirror.test:5000").name == "ghcr.io"
    assert r.for_client_host("mirror.test") is None
    assert r.for_client_host(None) is None
    assert r.for_proxy_target("registry-1.docker.io", 443).name == "docker.io"
    assert r.for_proxy_target("ghcr.io", 443).name == "ghcr.io"
    assert r.for_proxy_target("registry-1.docker.io", 8443) is None
    assert r.for_proxy_target("example.com", 443) is None
    assert hostname_of("[::1]:5000") == "::1"


def test_listener_target_becomes_the_default_registry():
    r = table("docker.io=https://registry-1.docker.io", "ghcr.io")
    local = r.with_default(Upstream("http", "127.0.0.1", 9000))
    assert local.default_upstream == Upstream("http", "127.0.0.1", 9000, "docker.io")
    assert local.table["ghcr.io"] == r.table["ghcr.io"]
    assert r.with_default(Upstream("https", "ghcr.io", 443)).default == "ghcr.io"
    with pytest.raises(RouteError):
        Registries({}, "docker.io").default_upstream


def test_token_requests_go_to_one_registry():
    r = table("docker.io=https://registry-1.docker.io", "ghcr.io")
    ghcr = r.table["ghcr.io"]
    assert r.for_token(None, None, []) == r.default_upstream
    assert r.for_token(None, "ghcr.io", ["owner/x"]) == ghcr
    assert r.for_token(None, None, ["ghcr.io/owner/x", "ghcr.io/owner/y"]) == ghcr
    assert r.for_token(ghcr, None, ["ghcr.io/owner/x", "owner/y"]) == ghcr  # host-mapped, both forms
    assert r.for_token(ghcr, None, ["google.com/project/x"]) == ghcr  # a dotted name of that registry
    for fixed, named, scopes, code in (
        (None, "evil.test", [], "NAME_UNKNOWN"),
        (None, "a/../b", [], "NAME_UNKNOWN"),
        (None, None, ["evil.test/x"], "NAME_UNKNOWN"),
        (None, None, ["ghcr.io/a", "nginx"], "DENIED"),
        (None, "docker.io", ["ghcr.io/a"], "DENIED"),
    ):
        with pytest.raises(RouteError) as e:
            r.for_token(fixed, named, scopes)
        assert e.value.code == code


def test_scope_map_strips_the_prefix_and_applies_the_library_rule_to_docker_hub_only():
    r = table("docker.io=https://registry-1.docker.io", "ghcr.io")
    def hub(scope):
        return str(r.upstream_scope(r.table["docker.io"], parse_scope(scope)))

    def ghcr(scope):
        return str(r.upstream_scope(r.table["ghcr.io"], parse_scope(scope)))

    assert hub("repository:nginx:pull") == "repository:library/nginx:pull"
    assert hub("repository:docker.io/nginx:pull") == "repository:library/nginx:pull"
    assert ghcr("repository:ghcr.io/owner/x:pull,push") == "repository:owner/x:pull,push"
    assert ghcr("repository:tool:pull") == "repository:tool:pull"
    assert ghcr("registry:catalog:*") == "registry:catalog:*"

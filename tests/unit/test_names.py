import pytest

from hubrewrite.registry.errors import RegistryError as RouteError
from hubrewrite.registry.names import RouteKind, official_name, parse_route
from hubrewrite.registry.registries import Registries
from hubrewrite.registry.scopes import parse_scope
from hubrewrite.registry.upstream import Upstream

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "path,kind,name,ref",
    [
        ("/v2/", RouteKind.BASE, "", ""),
        ("/v2", RouteKind.BASE, "", ""),
        ("/v2/_catalog", RouteKind.CATALOG, "", ""),
        ("/v2/library/nginx/manifests/1.27", RouteKind.MANIFEST, "library/nginx", "1.27"),
        (f"/v2/nginx/manifests/{D}", RouteKind.MANIFEST, "nginx", D),
        (f"/v2/a/b/c/blobs/{D}", RouteKind.BLOB, "a/b/c", D),
        ("/v2/a/b/tags/list", RouteKind.TAGS, "a/b", ""),
        ("/v2/a/blobs/uploads/", RouteKind.UPLOAD, "a", ""),
        ("/v2/a/blobs/uploads/uuid-1", RouteKind.UPLOAD, "a", "uuid-1"),
        (f"/v2/a/referrers/{D}", RouteKind.REFERRERS, "a", D),
        # a repository may itself be called "manifests" or "tags"
        ("/v2/tags/manifests/latest", RouteKind.MANIFEST, "tags", "latest"),
    ],
)
def test_valid_routes(path, kind, name, ref):
    route = parse_route(path)
    assert (route.kind, route.name, route.reference) == (kind, name, ref)
    if kind not in (RouteKind.BASE,):
        assert route.path() == path


@pytest.mark.parametrize(
    "path,status,code",
    [
        ("/v2/../../etc/passwd", 400, "NAME_INVALID"),
        ("/v2/%2e%2e/%2e%2e/etc/passwd", 400, "NAME_INVALID"),
        ("/v2/a//b/manifests/x", 400, "NAME_INVALID"),
        ("/v2/Upper/manifests/x", 400, "NAME_INVALID"),
        ("/v2/" + "a" * 256 + "/manifests/x", 400, "NAME_INVALID"),
        # a manifest reference that is no tag or digest names no manifest: 404, as the
        # spec (end-3) and distribution's router answer (the OCI conformance suite checks it)
        ("/v2/a/manifests/" + "t" * 129, 404, "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/-bad", 404, "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/", 404, "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/..", 404, "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/a:b", 404, "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/sha256:totallywrong", 404, "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/md5:" + "0" * 32, 404, "MANIFEST_UNKNOWN"),
        # ... but a bad name in a manifest route is still the name's fault
        ("/v2/a/../manifests/x", 400, "NAME_INVALID"),
        ("/v2//manifests/x", 400, "NAME_INVALID"),
        # blob and referrers digests: DIGEST_INVALID, as distribution (blobs) and the spec (referrers) say
        ("/v2/a/referrers/sha256:abcd", 400, "DIGEST_INVALID"),
        ("/v2/a/blobs/md5:abcd", 400, "DIGEST_INVALID"),
        ("/v2/a/blobs/sha256:abcd", 400, "DIGEST_INVALID"),
        ("/v2/a/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
        ("/v2/a/blobs/latest", 400, "DIGEST_INVALID"),
        ("/etc/passwd", 404, "UNSUPPORTED"),
        ("/v2/a/unknown/x", 404, "UNSUPPORTED"),
        ("/v2/a\\b/manifests/x", 400, "NAME_INVALID"),
    ],
)
def test_invalid_routes(path, status, code):
    with pytest.raises(RouteError) as e:
        parse_route(path)
    assert (e.value.status, e.value.code) == (status, code)


def test_official_prefix_only_for_single_segment_names():
    assert official_name("nginx", "library") == "library/nginx"
    assert official_name("bitnami/nginx", "library") == "bitnami/nginx"
    assert official_name("nginx", "") == "nginx"
    assert official_name("", "library") == ""


@pytest.mark.parametrize(
    "scope,expected",
    [
        ("repository:nginx:pull", "repository:library/nginx:pull"),
        ("repository:library/nginx:pull", "repository:library/nginx:pull"),
        ("repository:a/b:pull,push", "repository:a/b:pull,push"),
        ("repository(plugin):nginx:pull", "repository(plugin):library/nginx:pull"),
        ("registry:catalog:*", "registry:catalog:*"),
        ("garbage", None),
    ],
)
def test_rewrite_scope(scope, expected):
    hub = Upstream("https", "registry-1.docker.io", 443, "docker.io")
    registries = Registries({"docker.io": hub}, "docker.io")
    parsed = parse_scope(scope)
    assert (str(registries.upstream_scope(hub, parsed)) if parsed else None) == expected

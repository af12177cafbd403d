"""Shared pytest fixtures.

``test_ca``: the session's CA (tests/support/certs.py); both upstreams' HTTPS
certificates come from it, so one ``ssl_verify_upstream_trusted_ca`` trusts both.

``upstream``: a session-wide fake Docker Hub (tests/support/upstream.py), HTTPS like Docker Hub, with
the standard image set pushed once (``upstream.images``, also available as the
``upstream_images`` fixture).  The big layer is 256 MiB unless
``HUB_TEST_BIG_SIZE`` (bytes) says otherwise.  The registry storage is removed
at the end of the session unless ``HUB_TEST_KEEP_UPSTREAM=1``.

``second_upstream``: another, independent registry of the same kind (its own
token server, CDN, distribution and edge; token service ``ghcr.io``), standing
in for ghcr.io in the multi-registry tests, with a few KB of images
(``second_upstream.images``, see ``second_images``).
"""

import os
import shutil
import sys

import pytest


def pytest_configure(config):
    """Under pytest-xdist (``-n``) the controller starts the one image build its workers share, before
    it starts them; each worker's collection hook below then follows that build instead of making one."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput") \
            and image_tests_selected(config):
        from tests.integration import test_readme_container

        test_readme_container.start_image_build(for_workers=True)


def image_tests_selected(config) -> bool:
    """Whether the run's paths include the container image's tests (the controller collects nothing)."""
    target = config.rootpath / "tests" / "integration" / "test_readme_container.py"
    for arg in config.args:
        path = (config.invocation_params.dir / arg.split("::")[0]).resolve()
        if path == target or path in target.parents:
            return True
    return False


def pytest_collection_finish(session):
    """The container image takes minutes to build (mostly downloads from Debian's archive and the
    package index): when a collected test uses it, the build starts now, in the background at the
    lowest priority, and that test waits for it (tests/integration/test_readme_container.py)."""
    if any("container_image" in getattr(item, "fixturenames", ()) for item in session.items):
        from tests.integration import test_readme_container

        test_readme_container.start_image_build()


def pytest_sessionfinish(session):
    module = sys.modules.get("tests.integration.test_readme_container")
    if module is not None:
        module.stop_image_build()


def running_upstream(workdir, fill, **kwargs):
    """A started Upstream with images pushed by ``fill(up)``; stopped and its
    storage removed afterwards (unless HUB_TEST_KEEP_UPSTREAM=1)."""
    from tests.support.upstream import Upstream

    up = Upstream(workdir, **kwargs)
    up.start()
    try:
        up.images = fill(up)
        up.clear_logs()
        yield up
    finally:
        up.stop()
        if not os.environ.get("HUB_TEST_KEEP_UPSTREAM"):
            shutil.rmtree(up.storage_root, ignore_errors=True)


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory):
    from tests.support.certs import TestCA

    return TestCA(tmp_path_factory.mktemp("test-ca"))


@pytest.fixture(scope="session")
def upstream(tmp_path_factory, test_ca):
    from tests.support.images import standard_images

    big_size = int(os.environ.get("HUB_TEST_BIG_SIZE", 256 * 1024 * 1024))
    yield from running_upstream(tmp_path_factory.mktemp("upstream"), lambda up: standard_images(up, big_size=big_size),
                                ca=test_ca)


@pytest.fixture(scope="session")
def upstream_images(upstream):
    return upstream.images


SECOND_SERVICE = "ghcr.io"


def second_images(up) -> dict:
    """What ``second_upstream`` holds, as ``{repo: info}`` like ``standard_images``:

    * ``owner/tool:1.0``  single-arch Docker image, two small layers, public
    * ``private/secret:1.0``  Docker image; only alice (and admin) may pull (DEFAULT_ACL).
      Its content differs from the first upstream's ``private/secret``: other digests.
    """
    from tests.support.images import Pusher, push_image

    out = {}
    with Pusher(up) as p:
        out["owner/tool"] = push_image(up, "owner/tool", "1.0", [
            {"usr/bin/tool": "#!/bin/sh\necho ghcr tool\n"}, {"usr/share/tool/README": "from the second registry\n"}],
            media="docker", pusher=p)
        out["private/secret"] = push_image(up, "private/secret", "1.0", [{"secret.txt": "ghcr secret\n"}],
                                           media="docker", pusher=p)
    for info in out.values():
        info["ref"] = f"{info['repo']}:{info['tag']}"
    return out


@pytest.fixture(scope="session")
def second_upstream(tmp_path_factory, test_ca):
    yield from running_upstream(tmp_path_factory.mktemp("second-upstream"), second_images,
                                service=SECOND_SERVICE, issuer=SECOND_SERVICE, ca=test_ca)


@pytest.fixture(scope="session")
def ceph(tmp_path_factory):
    """A real S3 endpoint for the session: Ceph RGW on loopback, memstore (tests/support/ceph.py).

    Tests make their own buckets (``ceph.make_bucket(name)``) so they do not see
    each other's objects.  A test that stops radosgw must start it again."""
    from tests.support.ceph import CephRGW

    with CephRGW(tmp_path_factory.mktemp("ceph")) as rgw:
        yield rgw

"""Shared pytest fixtures.

``upstream``: a session-wide fake Docker Hub (tests/support/upstream.py) with
the standard image set pushed once (``upstream.images``, also available as the
``upstream_images`` fixture).  The big layer is 256 MiB unless
``HUB_TEST_BIG_SIZE`` (bytes) says otherwise.  The registry storage is removed
at the end of the session unless ``HUB_TEST_KEEP_UPSTREAM=1``.
"""

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def upstream(tmp_path_factory):
    from tests.support.images import standard_images
    from tests.support.upstream import Upstream

    big_size = int(os.environ.get("HUB_TEST_BIG_SIZE", 256 * 1024 * 1024))
    up = Upstream(tmp_path_factory.mktemp("upstream"))
    up.start()
    try:
        up.images = standard_images(up, big_size=big_size)
        up.clear_logs()
        yield up
    finally:
        up.stop()
        if not os.environ.get("HUB_TEST_KEEP_UPSTREAM"):
            shutil.rmtree(up.storage_root, ignore_errors=True)


@pytest.fixture(scope="session")
def upstream_images(upstream):
    return upstream.images

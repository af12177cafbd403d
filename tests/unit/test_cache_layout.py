"""The cache directory's layout stamp: new caches stamped, unstamped ones adopted once, newer ones refused."""

import json
import threading

import pytest

from hubrewrite.cache import layout
from hubrewrite.cache.layout import LAYOUT, STAMP, LayoutError
from hubrewrite.cache.store import Store
from tests.unit.test_store import put_blob


def stamp_of(root):
    return json.loads((root / STAMP).read_text())


def test_a_new_cache_is_stamped_with_this_layout(tmp_path):
    root = tmp_path / "cache"
    store = Store(root, 0)
    assert stamp_of(root)["layout"] == LAYOUT
    assert store.found == layout.Found(None, stamped=False)
    assert Store(root, 0).found == layout.Found(LAYOUT, stamped=True)


def test_a_cache_from_before_the_stamp_is_adopted_once_and_keeps_its_blobs(tmp_path):
    old = Store(tmp_path, 0)
    digest = put_blob(old, b"written by the previous version")
    (tmp_path / STAMP).unlink()  # as the previous version left it: the same files, no stamp

    adopted = Store(tmp_path, 0)
    assert adopted.found == layout.Found(0, stamped=False)
    assert "adopted" in adopted.found.plan()
    assert stamp_of(tmp_path)["layout"] == LAYOUT
    assert adopted.check_blob(digest) and adopted.blob_path(digest).read_bytes() == b"written by the previous version"
    assert Store(tmp_path, 0).found.stamped  # once


def test_a_newer_layout_is_refused_and_nothing_is_touched(tmp_path):
    (tmp_path / STAMP).write_text(json.dumps({"layout": LAYOUT + 1, "written_by": "9.0"}))
    with pytest.raises(LayoutError) as refused:
        Store(tmp_path, 0)
    message = str(refused.value)
    assert f"layout {LAYOUT + 1}" in message and "9.0" in message and "refusing" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [STAMP]  # no blobs/, tmp/ or secret made


@pytest.mark.parametrize("text", ["", "{", '{"layout": "1"}', '{"layout": 0}', "[1]", '{"other": 1}', '{"layout": true}'])
def test_an_unreadable_stamp_is_refused(tmp_path, text):
    (tmp_path / STAMP).write_text(text)
    with pytest.raises(LayoutError, match="not a layout stamp"):
        layout.open_layout(tmp_path)


def test_inspect_changes_nothing(tmp_path):
    assert layout.inspect(tmp_path / "missing") == layout.Found(None, stamped=False)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "blobs").mkdir()
    assert "adopted" in layout.inspect(tmp_path).plan()
    assert not (tmp_path / STAMP).exists()


def test_migrations_run_once_in_order_under_the_lock(tmp_path, monkeypatch):
    """A future layout 2: processes starting at once on a layout-1 cache migrate it exactly once."""
    Store(tmp_path, 0)
    runs = []

    def to_2(root):
        runs.append(root)

    monkeypatch.setattr(layout, "LAYOUT", 2)
    monkeypatch.setitem(layout.MIGRATIONS, 1, to_2)
    threads = [threading.Thread(target=layout.open_layout, args=(tmp_path,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert runs == [tmp_path]
    assert stamp_of(tmp_path)["layout"] == 2


def test_every_older_layout_has_a_migration():
    assert sorted(layout.MIGRATIONS) == list(range(LAYOUT))

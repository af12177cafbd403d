"""The open files the main port and the blob listener share."""

import pytest

from hubrewrite.connlimits import LISTENER_FILES, MAIN_PORT_FILES, MIN_CONNECTIONS, OWN_FILES, UPSTREAM_FILES, FileBudget


class FakeSettings:
    def __init__(self, max_connections: int, listener: bool) -> None:
        self.limits = type("L", (), {"max_connections": max_connections})()
        self.cache = type("C", (), {"blob_listen": ("127.0.0.1", 5001) if listener else None})()


@pytest.mark.parametrize("files,listener,expected", [
    (1024, False, (1024 - OWN_FILES - UPSTREAM_FILES) // MAIN_PORT_FILES),
    (1024, True, (1024 - OWN_FILES - UPSTREAM_FILES) // (MAIN_PORT_FILES + LISTENER_FILES)),
    (256, True, MIN_CONNECTIONS),
    (1 << 20, True, 1000),  # hub_max_connections
])
def test_each_port_gets_its_share_of_the_open_files(files, listener, expected):
    budget = FileBudget(lambda: FakeSettings(1000, listener))
    budget.file_limit = files
    assert budget.connections() == expected
    if MIN_CONNECTIONS < expected < 1000:  # bounded by the files: both ports at their limit fit in them
        per_connection = MAIN_PORT_FILES + (LISTENER_FILES if listener else 0)
        assert OWN_FILES + UPSTREAM_FILES + expected * per_connection <= files


def test_the_budget_raises_the_soft_file_limit_to_the_hard_one():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert FileBudget(lambda: FakeSettings(1000, False)).file_limit == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0]

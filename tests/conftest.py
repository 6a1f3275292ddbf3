"""Shared test fixtures: the real-data directory and the slow marker."""

import os

import pytest

from dlfix_jax.data.base import default_data_dir


def shared_data_dir(sub: str = "") -> str:
    """Path of ``../shared/data[/sub]``; skips the test when it is absent."""
    root = default_data_dir()
    path = os.path.join(root, sub) if root else None
    if not path or not os.path.exists(path):
        pytest.skip(f"needs real data at ../shared/data/{sub} (or $DLFIX_DATA_DIR)")
    return path


@pytest.fixture
def data_dir():
    return shared_data_dir()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DLFIX_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow paper-scale run; set DLFIX_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

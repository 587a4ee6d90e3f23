from pathlib import Path

import pytest
from pretrain_runs import write_shards  # tests/pretrain_runs.py (tests/ is on sys.path via its conftest)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    """12 tiny images in 2 shards for a method's runs through the engine (SoCo overrides it with real boxes)."""
    return write_shards(tmp_path_factory.mktemp("shards"))

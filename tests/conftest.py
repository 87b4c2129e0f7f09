"""One Spark session for the whole test run (local[2], UI off, 2 shuffle partitions)."""

from __future__ import annotations

import pytest

from patternlake.config import Config, load_config
from patternlake.spark import get_spark


@pytest.fixture(scope="session")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    root = tmp_path_factory.mktemp("lake")
    return load_config(
        "local",
        [f"lake.root={root}", "spark.shuffle_partitions=2", "spark.ui=false", "spark.master=local[2]"],
        environ={},
    )


@pytest.fixture(scope="session")
def spark(config: Config):
    session = get_spark(config.spark)
    yield session
    session.stop()

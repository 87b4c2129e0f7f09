"""One Spark session for the whole test run (local[2], UI off, 2 shuffle partitions)."""

from __future__ import annotations

import pytest

from patternlake.config import Config, load_config
from patternlake.spark import get_spark
from tests.cluster import cluster  # noqa: F401  (a fixture: Spark standalone on 127.0.0.1)


@pytest.fixture(scope="session")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    root = tmp_path_factory.mktemp("lake")
    return load_config(
        "local",
        [
            f"lake.root={root}",
            "spark.shuffle_partitions=2",
            "spark.ui=false",
            "spark.master=local[2]",
            "features.max_history=50",  # small enough that the generated users are cut
        ],
        environ={},
    )


@pytest.fixture(scope="session")
def spark(config: Config):
    session = get_spark(config.spark)
    yield session
    session.stop()


@pytest.fixture
def stage(spark, config: Config, tmp_path):
    """A fresh, empty lake for one test: (config, lake)."""
    from patternlake.lake import Lake

    cfg = config.model_copy(
        update={"lake": config.lake.model_copy(update={"root": str(tmp_path / "lake")})}
    )
    return cfg, Lake(spark, cfg.lake)


def in_folder(config: Config, folder, **sections) -> Config:
    """``config`` with its lake, model store and MLflow tracking all under ``folder``, then
    ``sections`` overridden (as ``with_overrides``)."""
    cfg = config.model_copy(
        update={"lake": config.lake.model_copy(update={"root": str(folder / "lake")})}
    )
    return with_overrides(
        cfg,
        models={"root": str(folder / "models")},
        mlflow={
            "tracking_uri": f"sqlite:///{folder}/mlruns.db",
            "artifact_location": str(folder / "artifacts"),
        },
        **sections,
    )


def with_overrides(config: Config, **sections) -> Config:
    """A copy of ``config`` with some keys of some sections changed: with_overrides(c, mine={"min_lift": 3})."""
    update = {}
    for section, values in sections.items():
        attr = "validate_" if section == "validate" else section
        update[attr] = getattr(config, attr).model_copy(update=values)
    return config.model_copy(update=update)


@pytest.fixture(scope="session")
def small_events(tmp_path_factory):
    """Generated events (300 users, 15k events, 2 time-ordered CSV files) with ground truth."""
    from patternlake.config import GenerateConfig
    from patternlake.synthetic.generate import generate

    out = tmp_path_factory.mktemp("small_events")
    params = GenerateConfig(
        users=300,
        items=200,
        events=15_000,
        segments=3,
        rules_per_segment=3,
        rule_length=3,
        rule_strength=0.8,
        rule_noise=0.05,
        chain_rate=0.25,
        zipf_exponent=1.1,
        categories=12,
        start="2026-01-01T00:00:00Z",
        days=30,
        seed=11,
        format="csv",
        files=2,
    )
    generate(params, out)
    return out


@pytest.fixture(scope="session")
def daily_lake(spark, config, tmp_path_factory):
    """`patternlake generate` at default settings run through `run daily`: (work dir, lake, config)."""
    from patternlake.cli import main
    from patternlake.lake import Lake

    work = tmp_path_factory.mktemp("daily")
    assert main(["generate", "--out", str(work / "data")]) == 0  # conf defaults
    root = work / "lake"
    assert (
        main(
            [
                "--set",
                f"lake.root={root}",
                "--set",  # its own (empty) registry: `score`, the last daily step, waits for a model
                f"mlflow.tracking_uri=sqlite:///{work}/mlruns.db",
                "run",
                "daily",
                "--input",
                str(work / "data" / "events"),
            ]
        )
        == 0
    )
    cfg = config.model_copy(update={"lake": config.lake.model_copy(update={"root": str(root)})})
    return work, Lake(spark, cfg.lake)


@pytest.fixture(scope="session")
def trained_lake(spark, config, daily_lake, tmp_path_factory):
    """The daily lake with a registered teacher (single process, 12 epochs), a deliberately
    weak shared student (refused by the gate), then a real one, compressed:
    (config, lake, teacher result, weak distill, weak champions, distill, compress)."""
    from patternlake import registry
    from patternlake.students.compress import compress
    from patternlake.students.distill import distill
    from patternlake.training.train import train_teacher

    _, lake = daily_lake
    cfg = in_folder(
        config,
        tmp_path_factory.mktemp("students"),
        train={"epochs": 12, "patience": 4, "backend": "single"},
        students={"epochs": 30, "patience": 5},
        compress={"sparsity": [0.5, 0.0]},
    )
    cfg = cfg.model_copy(update={"lake": cfg.lake.model_copy(update={"root": lake.root})})
    teacher = train_teacher(spark, lake, cfg, "single")
    # a deliberately weak student first: one epoch at a learning rate that cannot move it
    weak_cfg = with_overrides(cfg, students={"epochs": 1, "lr": 1e-7, "d_model": [8]})
    weak = distill(spark, lake, weak_cfg)
    segments = [r[0] for r in lake.read("segments").select("segment_id").distinct().collect()]
    weak_champions = {g: registry.champion_version(cfg, g) for g in segments}
    good = distill(spark, lake, cfg)
    packed = compress(spark, lake, cfg)
    return cfg, lake, teacher, weak, weak_champions, good, packed


def copy_trained_lake(trained_lake, dest, **sections):
    """A private copy of the trained daily lake (lake, model store, MLflow database) under
    ``dest``, for tests that change it: (config, lake, --set arguments for the CLI)."""
    import shutil

    from patternlake.lake import Lake

    cfg0, lake0, *_ = trained_lake
    shutil.copytree(lake0.root, dest / "lake")
    shutil.copytree(cfg0.models.root, dest / "models")
    shutil.copy(cfg0.mlflow.tracking_uri.removeprefix("sqlite:///"), dest / "mlruns.db")
    cfg = in_folder(cfg0, dest, **sections)
    cfg = with_overrides(cfg, mlflow={"artifact_location": cfg0.mlflow.artifact_location})
    args = [
        "--set", f"lake.root={dest / 'lake'}",
        "--set", f"models.root={dest / 'models'}",
        "--set", f"mlflow.tracking_uri=sqlite:///{dest}/mlruns.db",
        "--set", f"mlflow.artifact_location={cfg0.mlflow.artifact_location}",
    ]  # fmt: skip
    return cfg, Lake(lake0.spark, cfg.lake), args


def comparable(df, keep=lambda field: True):
    """``df`` ready for ``exceptAll`` (set operations refuse maps): the fields ``keep``
    accepts, map columns as JSON text."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import MapType

    return df.select(
        *[
            F.to_json(F.col(f.name)).alias(f.name)
            if isinstance(f.dataType, MapType)
            else F.col(f.name)
            for f in df.schema.fields
            if keep(f)
        ]
    )

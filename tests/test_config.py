import shutil
from pathlib import Path

import pytest

import patternlake
from patternlake.config import CONF_DIR_ENV, default_conf_dir, load_config, packaged_dir
from patternlake.errors import ConfigError


def test_local_is_the_embedded_default():
    c = load_config(environ={})
    assert c.env == "local"
    assert c.spark.master == "local[2]"
    assert c.spark.ui is False
    assert c.lake.engine == "auto"
    assert c.table("silver_events").path == "silver/events"


def test_environment_files_override_base():
    cluster = load_config("cluster", environ={})
    assert cluster.spark.master is None  # spark-submit decides
    assert cluster.lake.root.startswith("s3a://")  # Hadoop's S3 file system, as Spark spells it
    assert load_config("databricks", environ={}).lake.engine == "auto"


def test_env_vars_then_set_flags_override_in_that_order():
    env = {"PATTERNLAKE__SPARK__SHUFFLE_PARTITIONS": "7", "PATTERNLAKE__LAKE__ROOT": "/env/root"}
    c = load_config(environ=env)
    assert c.spark.shuffle_partitions == 7 and c.lake.root == "/env/root"
    c = load_config(
        overrides=["spark.shuffle_partitions=9", "mine.cooccurrence=false"], environ=env
    )
    assert c.spark.shuffle_partitions == 9
    assert c.mine.cooccurrence is False
    assert c.lake.root == "/env/root"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lake.engin=delta-rs", "lake.engin: unknown key"),
        (
            "spark.shuffle_partitions=abc",
            "spark.shuffle_partitions: Input should be a valid integer",
        ),
        ("spark.shuffle_partitions=0", "spark.shuffle_partitions: Input should be greater than 0"),
        ("lake.engine=hive", "lake.engine: Input should be 'auto' or 'delta-spark'"),
        ("lake.engine=delta-rs", "the delta-rs writer was retired"),
        ("lake.tables.silver_events.path=../escape", "lake.tables.silver_events.path"),
        ("validate.max_invalid_share=1.5", "validate.max_invalid_share"),
    ],
)
def test_bad_keys_and_values_fail_with_their_path(override, message):
    with pytest.raises(ConfigError, match="bad configuration") as err:
        load_config(overrides=[override], environ={})
    assert message in str(err.value)


def test_bad_env_var_and_bad_set_syntax_and_unknown_env():
    with pytest.raises(ConfigError, match="spark.ui"):
        load_config(environ={"PATTERNLAKE__SPARK__UI": "[1, 2]"})
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(overrides=["spark.ui"], environ={})
    with pytest.raises(ConfigError, match="no such environment"):
        load_config("production", environ={})
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(overrides=["spark.ui.x=1"], environ={})


def test_a_yaml_file_can_be_the_environment(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("lake:\n  root: /data/lake\nspark:\n  shuffle_partitions: 3\n")
    c = load_config(str(f), environ={})
    assert (c.lake.root, c.spark.shuffle_partitions, c.env) == ("/data/lake", 3, "mine")


def test_unknown_table_name_is_a_config_error():
    with pytest.raises(ConfigError, match="lake.tables.nope"):
        load_config(environ={}).table("nope")


def test_in_a_checkout_conf_and_pipelines_are_the_top_level_folders():
    """The tests run from the checkout (the dev venv's editable install): the package folder
    has no conf/ or pipelines/, the repository's top-level ones are used."""
    repo = Path(__file__).resolve().parents[1]
    assert Path(patternlake.__file__).resolve().parent == repo / "libs" / "patternlake"
    assert packaged_dir("conf").resolve() == repo / "conf"
    assert packaged_dir("pipelines").resolve() == repo / "pipelines"
    assert (repo / "conf" / "base.yaml").is_file()


def test_conf_dir_is_the_env_var_then_a_local_conf_then_the_package(tmp_path, monkeypatch):
    packaged = packaged_dir("conf")
    monkeypatch.delenv(CONF_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_conf_dir() == packaged
    assert load_config(environ={}).env == "local"
    (tmp_path / "conf").mkdir()
    assert default_conf_dir() == packaged  # a ./conf without base.yaml is not a conf dir
    shutil.copy(packaged / "base.yaml", tmp_path / "conf")
    (tmp_path / "conf" / "local.yaml").write_text("spark:\n  app_name: from-cwd\n")
    assert default_conf_dir() == tmp_path / "conf"
    assert load_config(environ={}).spark.app_name == "from-cwd"
    other = tmp_path / "other"
    shutil.copytree(packaged, other)
    monkeypatch.setenv(CONF_DIR_ENV, str(other))
    assert default_conf_dir() == other
    assert load_config(environ={}).spark.app_name != "from-cwd"


def test_every_setting_has_one_default_in_base_yaml():
    """The typed model reads conf/base.yaml and holds no default of its own (so a default
    cannot differ between base.yaml and the code); the teacher network takes every field of
    the teacher section from conf (``softmax`` through ``train_spec.softmax_choice``)."""
    from dataclasses import fields

    from pydantic import BaseModel

    from patternlake.config import Config, TeacherModelConfig
    from patternlake.models.teacher import STUDENT_FIELDS, TeacherConfig

    def defaults(model: type[BaseModel], path: str) -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            key = f"{path}{field.alias or name}"
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                found += defaults(kind, f"{key}.")
            elif not field.is_required():
                found.append(key)
        return found

    assert defaults(Config, "") == []
    network = {f.name for f in fields(TeacherConfig)} - {"n_items", "n_types", "n_gaps"}
    network -= set(STUDENT_FIELDS)  # heads and the students' search set them, from their sections
    # softmax (auto/full/sampled) is decided into sampled_softmax by the training spec
    assert network == set(TeacherModelConfig.model_fields) - {"softmax"}

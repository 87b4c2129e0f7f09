"""The wheel runs with no checkout: conf, expectation suites and pipelines are package data.

They live at the top of the repository (``conf/``, ``pipelines/``); the build carries them
into the wheel as ``patternlake/conf/`` and ``patternlake/pipelines/``. The wheel is built
from a copy of the sources (setuptools writes ``build/`` and an ``.egg-info`` next to what it
builds), installed with ``--no-deps`` into a new venv outside the checkout whose only way to
the dependencies is a ``.pth`` line naming this venv's site-packages (the ``.pth`` files in
there, the editable install among them, are not processed), and its ``patternlake`` command
is run from an empty folder. An editable install of such a copy finds the copy's top-level
folders.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# top-level folders, shipped as patternlake/conf and patternlake/pipelines
DATA = ("conf", "pipelines")
SOURCES = ("pyproject.toml", "README.md", "libs", *DATA)  # what the build reads

pytestmark = pytest.mark.slow


def _run(cmd: list, cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{cmd}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would point a child at the checkout, at this
    venv's Python or at other settings (``get_spark`` sets ``PYSPARK_PYTHON`` in-process)."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON"}
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith("PATTERNLAKE") and not k.startswith("PYTEST")
    }
    return {**env, **extra}


def _packaged_files() -> set[str]:
    """The top-level conf and pipelines files as the wheel names them
    (conf/base.yaml -> patternlake/conf/base.yaml, ...)."""
    return {
        f"patternlake/{p.relative_to(REPO).as_posix()}"
        for name in DATA
        for p in (REPO / name).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def _copy_sources(src: Path) -> Path:
    src.mkdir(exist_ok=True)
    for name in SOURCES:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        else:
            shutil.copy(REPO / name, src / name)
    return src


def _new_venv(where: Path, installable: Path) -> Path:
    """A venv at ``where`` with ``installable`` (a wheel) installed with ``--no-deps``, whose
    way to the dependencies is a ``.pth`` naming this venv's site-packages; its python."""
    _run([sys.executable, "-m", "venv", "--without-pip", where], cwd=where.parent, env=_clean_env())
    python = where / "bin" / "python"
    env = _clean_env()
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index"]
        + ["--disable-pip-version-check", "-q", installable],
        cwd=where.parent,
        env=env,
    )
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([python, "-c", purelib], cwd=where.parent, env=env).strip())
    here = sysconfig.get_paths()
    (site / "patternlake-test-deps.pth").write_text(
        "\n".join(dict.fromkeys([here["purelib"], here["platlib"]])) + "\n"
    )
    return python


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _copy_sources(tmp_path_factory.mktemp("src"))
    dist = tmp_path_factory.mktemp("dist")
    # an absolute path: a bare word would be looked up as a project name on the index
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--disable-pip-version-check", "-q", "-w", dist, src.resolve()],
        cwd=dist,
        env=_clean_env(),
    )
    (whl,) = dist.glob("patternlake-*.whl")
    return whl


def test_the_wheel_carries_every_conf_suite_and_pipeline_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = _packaged_files()
    assert {
        "patternlake/conf/base.yaml",
        "patternlake/conf/local.yaml",
        "patternlake/conf/cluster.yaml",
        "patternlake/conf/databricks.yaml",
        "patternlake/conf/expectations/events.json",
        "patternlake/pipelines/daily.yaml",
        "patternlake/pipelines/train.yaml",
        "patternlake/pipelines/all.yaml",
    } <= packaged
    assert packaged <= names, packaged - names
    assert {n for n in names if n.startswith(tuple(f"patternlake/{d}/" for d in DATA))} == packaged
    # only the package: no top-level conf/ or pipelines/ next to it
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"patternlake"}, tops


def test_imported_from_the_zipped_wheel_conf_and_pipelines_still_load(wheel, tmp_path):
    """As ``spark-submit --py-files patternlake.zip`` ships it (the wheel renamed: Spark puts
    only .zip/.egg files on the path): the package is imported from the zip, its conf and
    pipelines are copied out to a temporary folder."""
    archive = tmp_path / "patternlake.zip"
    shutil.copy(wheel, archive)
    out = _run(
        [
            sys.executable,
            "-c",
            "import patternlake\n"
            "from patternlake.config import default_conf_dir, load_config\n"
            "from patternlake.pipeline import pipeline_steps\n"
            "from patternlake.quality.suite import load_suite\n"
            "c = load_config('cluster', environ={})\n"
            "print(patternlake.__file__)\n"
            "print(default_conf_dir())\n"
            "print(c.env, c.lake.root, ','.join(pipeline_steps('daily')))\n"
            "print(len(load_suite(c.validate_).expectations))\n",
        ],
        cwd=tmp_path,
        env=_clean_env(PYTHONPATH=str(archive)),
    )
    file, conf_dir, loaded, expectations = out.splitlines()
    assert file.startswith(str(archive))
    assert not Path(conf_dir).exists()  # copied out for that process, removed at its exit
    assert not conf_dir.startswith((str(REPO), str(archive)))
    assert (
        loaded == "cluster s3a://my-bucket/patternlake ingest,validate,featurize,segment,mine,score"
    )
    assert int(expectations) > 0


@pytest.mark.timeout(600)
def test_installed_wheel_generates_and_runs_daily_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    python = _new_venv(venv, wheel)
    # the Delta jars `make setup` fetched, named as a user of the wheel names theirs
    from patternlake.spark import DELTA_JARS_ENV, delta_jar_dir

    env = _clean_env(**{DELTA_JARS_ENV: str(delta_jar_dir())})
    here = sysconfig.get_paths()

    work = tmp_path / "work"  # an empty working folder: no ./conf, no ./pipelines
    work.mkdir()
    out = _run(
        [
            python,
            "-c",
            "import patternlake, pyspark\n"
            "from patternlake.config import default_conf_dir\n"
            "print(patternlake.__file__)\n"
            "print(default_conf_dir())\n"
            "print(pyspark.__file__)\n",
        ],
        cwd=work,
        env=env,
    )
    package, conf_dir, pyspark_file = out.splitlines()
    assert Path(package).is_relative_to(venv) and not Path(package).is_relative_to(REPO)
    assert Path(conf_dir) == Path(package).parent / "conf"
    assert Path(pyspark_file).is_relative_to(here["purelib"])  # the dependencies: this venv's

    pl = venv / "bin" / "patternlake"
    small = ["--users", "300", "--items", "200", "--events", "15000", "--segments", "3"]
    _run([pl, "generate", "--out", "data", *small, "--files", "2", "--days", "30"], work, env)
    settings = ["--set", "spark.shuffle_partitions=2", "--set", "spark.ui=false"]
    settings += ["--set", "spark.master=local[2]"]
    out = _run([pl, *settings, "run", "daily", "--input", "data/events"], work, env, timeout=480)
    assert "mine" in out, out

    from deltalake import DeltaTable

    lake = work / "lake"  # local.yaml's ./lake, in the working folder
    for table in ("bronze/events", "silver/events", "gold/user_sequences", "gold/segments"):
        assert DeltaTable.is_deltatable(str(lake / table)), table
    sequences = DeltaTable(str(lake / "gold" / "user_sequences")).to_pyarrow_table(
        columns=["user_id"]
    )
    assert len(set(sequences.column("user_id").to_pylist())) == 300
    runs = DeltaTable(str(lake / "ops" / "runs")).to_pyarrow_table(columns=["step", "status"])
    assert {r["step"]: r["status"] for r in runs.to_pylist()} == dict.fromkeys(
        ["ingest", "validate", "featurize", "segment", "mine", "score"], "succeeded"
    )
    assert not (work / "conf").exists() and not (work / "pipelines").exists()


def test_an_editable_install_uses_the_top_level_conf_and_pipelines(tmp_path):
    """``pip install -e .`` (the dev venv): the package is the copy's ``libs/patternlake``,
    which has no ``conf/`` or ``pipelines/``; the copy's top-level folders are used, also
    from a working folder with no ``./conf``."""
    src = _copy_sources(tmp_path / "src")
    dist = tmp_path / "dist"
    dist.mkdir()
    # PEP 660's hook, as pip calls it (no setuptools in the new venv to build with)
    hook = f"from setuptools import build_meta; build_meta.build_editable({str(dist)!r})"
    _run([sys.executable, "-c", hook], cwd=src, env=_clean_env())
    (editable,) = dist.glob("patternlake-*.whl")
    python = _new_venv(tmp_path / "venv", editable)
    work = tmp_path / "work"
    work.mkdir()
    out = _run(
        [
            python,
            "-c",
            "import patternlake\n"
            "from patternlake.config import default_conf_dir, load_config, packaged_dir\n"
            "from patternlake.pipeline import pipeline_steps\n"
            "from patternlake.quality.suite import load_suite\n"
            "c = load_config('cluster', environ={})\n"
            "print(patternlake.__file__)\n"
            "print(default_conf_dir())\n"
            "print(packaged_dir('pipelines'))\n"
            "print(','.join(pipeline_steps('train')))\n"
            "print(len(load_suite(c.validate_).expectations))\n",
        ],
        cwd=work,
        env=_clean_env(),
    )
    file, conf_dir, pipelines, steps, expectations = out.splitlines()
    src = src.resolve()
    assert Path(file).resolve() == src / "libs" / "patternlake" / "__init__.py"
    assert Path(conf_dir).resolve() == src / "conf"
    assert Path(pipelines).resolve() == src / "pipelines"
    assert steps.split(",")[0] == "train"
    assert int(expectations) > 0

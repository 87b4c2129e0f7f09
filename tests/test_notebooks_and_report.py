"""Every notebook runs as plain Python against a small scored lake; the report renders."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.py"))


@pytest.fixture(scope="module")
def scored_copy(spark, trained_lake, tmp_path_factory):
    from patternlake.monitoring.monitor import monitor
    from patternlake.scoring.score import score_users
    from tests.conftest import copy_trained_lake

    cfg, lake, _ = copy_trained_lake(
        trained_lake, tmp_path_factory.mktemp("notebooks"), score={"explain_events": 5}
    )
    score_users(spark, lake, cfg, "notebook-run")
    monitor(spark, lake, cfg)
    return cfg, lake


def test_notebooks_are_databricks_source_files():
    assert len(NOTEBOOKS) >= 3
    for nb in NOTEBOOKS:
        text = nb.read_text()
        assert text.startswith("# Databricks notebook source\n"), nb
        assert "# COMMAND ----------" in text, nb


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_as_plain_python(scored_copy, notebook):
    cfg, _ = scored_copy
    env = {
        **os.environ,
        "PATTERNLAKE__LAKE__ROOT": cfg.lake.root,
        "PATTERNLAKE__MODELS__ROOT": cfg.models.root,
        "PATTERNLAKE__MLFLOW__TRACKING_URI": cfg.mlflow.tracking_uri,
        "PATTERNLAKE__SPARK__SHUFFLE_PARTITIONS": "2",
        "PATTERNLAKE__SPARK__UI": "false",
    }
    done = subprocess.run(
        [sys.executable, str(notebook)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "a notebook shows something"


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.headings, self.tables = [], [], 0
        self._h2 = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._h2 = tag == "h2"
        self.tables += tag == "table"

    def handle_data(self, data):
        if self._h2:
            self.headings.append(data)
            self._h2 = False


@pytest.mark.slow
def test_report_is_one_html_file_with_a_plot_per_section(scored_copy, tmp_path):
    import matplotlib.image

    from patternlake.cli import main

    cfg, _ = scored_copy
    out = tmp_path / "report.html"
    args = [
        "--set", f"lake.root={cfg.lake.root}",
        "--set", f"models.root={cfg.models.root}",
        "--set", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
    ]  # fmt: skip
    assert main([*args, "report", "--out", str(out)]) == 0
    page = _Images()
    page.feed(out.read_text())
    assert page.headings == [
        "Data quality per batch",
        "Segments and their top patterns",
        "Teacher training",
        "Students: quality and compression per segment",
        "Scoring",
        "Drift over time",
    ]
    assert len(page.images) == 6 and page.tables >= 5
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        pixels = matplotlib.image.imread(
            io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png"
        )
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0.01  # not blank
    assert "does not exist yet" not in out.read_text()


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="no chromium (make setup installs it with apt when run as root)",
)
def test_report_renders_in_headless_chromium(scored_copy, tmp_path):
    import matplotlib.image

    from patternlake.reporting.report import build_report

    cfg, lake = scored_copy
    page = build_report(lake, cfg, str(tmp_path / "report.html"))["path"]
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--window-size=1200,3000", f"--screenshot={shot}", Path(page).as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (3000, 1200)
    # rendered, not blank: the page's plots and tables make many non-white rows
    ink = (pixels[..., :3].mean(axis=2) < 0.9).any(axis=1).mean()
    assert ink > 0.3, ink

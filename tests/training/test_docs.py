"""What the docs say about how Horovod starts on Spark matches Horovod 0.28.1's code."""

import inspect
import re
from pathlib import Path

REPO = Path(__file__).parents[2]
DOCS = [
    REPO / "README.md",
    REPO / "conf" / "base.yaml",
    *sorted((REPO / "libs" / "patternlake" / "training").glob("*.py")),
    REPO / "libs" / "patternlake" / "models" / "fit.py",  # the training function
    REPO / "tests" / "training" / "test_cluster.py",
]


def test_horovod_spark_run_starts_plain_tasks_not_barrier_tasks():
    import horovod.spark.runner as runner

    source = inspect.getsource(runner)
    assert "mapPartitionsWithIndex" in source
    assert ".barrier()" not in source
    assert "start_timeout" in source


def test_docs_never_say_horovod_runs_on_barrier_tasks():
    for path in DOCS:
        text = " ".join(path.read_text().split())
        for m in re.finditer("barrier", text, flags=re.IGNORECASE):
            before = text[max(0, m.start() - 60) : m.start()]
            # only TorchDistributor (DDP) uses barrier mode; Horovod's tasks are "not barrier"
            assert before.endswith("not ") or re.search("TorchDistributor|DDP", before), (
                f"{path.name}: ...{text[max(0, m.start() - 80) : m.end() + 20]}..."
            )
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "mapPartitionsWithIndex" in readme and "start_timeout" in readme

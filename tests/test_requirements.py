"""The lock must install on any machine: index packages only, no paths into one home cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "check_requirements", ROOT / "scripts" / "check_requirements.py"
)
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def test_lock_names_index_packages_only():
    for path in sorted((ROOT / "requirements").glob("*.txt")):
        assert check.offending_lines(path) == [], path
    assert check.pyproject_offending(ROOT / "pyproject.toml") == []


def test_local_wheel_line_is_caught(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "numpy==2.4.6\n"
        "# a comment @ file:///ignored\n"
        "horovod @ file:///root/.cache/patternlake/wheels/horovod-0.28.1.whl#sha256=abc\n"
        "./vendor/thing.whl\n"
        "pkg @ https://example.com/pkg.whl\n"
        "--find-links /root/wheels\n"
    )
    bad = check.offending_lines(lock)
    assert [b.split(":")[1] for b in bad] == ["3", "4", "5", "6"]
    assert check.main([str(lock)]) == 1

"""Fail when a requirement names something other than a package on the index.

A lock line such as ``horovod @ file:///root/.cache/...whl`` installs only on the machine
that built that wheel; every other machine fails. The lock (and pyproject's dependencies)
must name index packages only: Horovod is built by ``scripts/build_horovod.sh``.

    python scripts/check_requirements.py [FILE ...]   (default: requirements/*.txt)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a direct reference (name @ url), a bare path or URL, an editable or a find-links option
_LOCAL = re.compile(
    r"(\s@\s)|(^[./~])|(://)|(^-e\b)|(^--?(find-links|f|index-url|extra-index-url)\b)"
)


def offending_lines(path: Path) -> list[str]:
    bad = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line and _LOCAL.search(line):
            bad.append(f"{path.name}:{number}: {line}")
    return bad


def pyproject_offending(path: Path) -> list[str]:
    import tomllib

    project = tomllib.loads(path.read_text()).get("project", {})
    deps = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        deps += extra
    return [f"{path.name}: {d}" for d in deps if _LOCAL.search(d)]


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or sorted((ROOT / "requirements").glob("*.txt"))
    bad = [line for f in files for line in offending_lines(f)]
    bad += pyproject_offending(ROOT / "pyproject.toml")
    if bad:
        print(
            "requirements must name packages from the index only (no local paths, URLs or "
            "direct references; Horovod is built by scripts/build_horovod.sh):\n  "
            + "\n  ".join(bad),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

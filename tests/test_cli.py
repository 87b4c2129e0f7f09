"""The command line: user errors print one line and exit 2, never a traceback."""

import json
import subprocess
import sys

import pytest

from patternlake.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "patternlake.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_then_user_errors_exit_2_without_traceback(tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "--out",
                str(tmp_path / "g"),
                "--users",
                "20",
                "--events",
                "400",
                "--items",
                "200",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["unique_events"] == 400
    for argv, text in [
        (["--set", "lake.engin=x", "config"], "lake.engin: unknown key"),
        (["--conf", "nope", "config"], "no such environment"),
        (["generate", "--out", str(tmp_path / "g2"), "--users", "-1"], "generate.users"),
        (["generate", "--out", "/proc/forbidden/x"], "cannot write"),
        (["ingest", str(tmp_path / "missing")], "does not exist"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert text in err, (argv, err)
        assert "Traceback" not in err


def test_missing_table_and_bad_arguments_in_a_real_process(tmp_path):
    r = run_cli("--set", f"lake.root={tmp_path}/lake", "lake", "history", "silver_events")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("patternlake: error: no Delta table")
    assert "Traceback" not in r.stderr
    r = run_cli("generate")
    assert r.returncode == 2 and "--out" in r.stderr


@pytest.mark.parametrize(
    "command",
    ["generate", "ingest", "validate", "featurize", "segment", "mine", "run", "lake", "tune"],
)
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as code:
        main([command, "--help"])
    assert code.value.code == 0
    assert "usage: patternlake" in capsys.readouterr().out

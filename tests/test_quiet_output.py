"""An embedded Spark starts quietly: the JVM's incubator-modules notice is dropped from its
stderr, and everything else the JVM writes still arrives."""

import subprocess
import sys
import textwrap

import pytest

from patternlake.spark import _STDERR_FILTER, JVM_NOTICE


def _filtered(data: bytes) -> bytes:
    done = subprocess.run(
        [sys.executable, "-c", _STDERR_FILTER, JVM_NOTICE.decode()],
        input=data,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_filter_drops_the_notice_on_the_first_line_only():
    notice = JVM_NOTICE + b" jdk.incubator.vector\n"
    rest = b"26/12/06 18:13:53 ERROR Executor: a real problem\n\r[Stage 1:>   (0 + 2) / 2]"
    assert _filtered(notice + rest) == rest
    assert _filtered(rest + notice) == rest + notice  # later, it is not the JVM's start
    assert _filtered(b"") == b""
    assert _filtered(b"WARN") == b"WARN"  # a prefix of the notice that ends early


@pytest.mark.slow
def test_an_embedded_session_starts_without_the_jvm_notice(tmp_path):
    script = textwrap.dedent(
        """
        from patternlake.config import load_config
        from patternlake.spark import get_spark

        spark = get_spark(load_config("local", ["spark.shuffle_partitions=2"], environ={}).spark)
        assert spark.range(3).count() == 3
        spark._jvm.java.lang.System.err.println("the JVM's stderr still arrives")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "the JVM's stderr still arrives" in done.stderr
    assert "incubator" not in done.stderr, done.stderr
    assert " WARN " not in done.stderr, done.stderr

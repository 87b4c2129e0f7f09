"""Progress bars: drawn on a terminal only, never in logs, Spark tasks or other ranks."""

import io
import logging

import pytest

from patternlake import progress as progress_module
from patternlake.progress import ENV, enabled, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def stderr(monkeypatch):
    """A fake stderr, no progress variables set: a test picks whether it is a terminal."""
    for var in (ENV, *progress_module._RANK_VARS):
        monkeypatch.delenv(var, raising=False)

    def use(stream):
        monkeypatch.setattr("sys.stderr", stream)
        return stream

    return use


def test_no_bar_when_stderr_is_not_a_terminal(stderr):
    out = stderr(io.StringIO())
    assert not enabled()
    assert list(progress(range(3), desc="work")) == [0, 1, 2]
    with progress(desc="work", total=3) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_a_bar_on_a_terminal(stderr):
    out = stderr(_Terminal())
    assert enabled()
    assert list(progress(range(3), desc="work", unit="segment")) == [0, 1, 2]
    assert "work" in out.getvalue() and "segment" in out.getvalue()


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_the_variable_turns_bars_off_on_a_terminal(stderr, monkeypatch, value):
    out = stderr(_Terminal())
    monkeypatch.setenv(ENV, value)
    assert not enabled()
    list(progress(range(3), desc="work"))
    assert out.getvalue() == ""


def test_the_variable_forces_bars_on(stderr, monkeypatch):
    stderr(io.StringIO())
    monkeypatch.setenv(ENV, "1")
    assert enabled()


@pytest.mark.parametrize("var", ["HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "RANK"])
def test_no_bar_in_a_process_other_than_rank_0(stderr, monkeypatch, var):
    stderr(_Terminal())
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setenv(var, "1")
    assert not enabled()
    monkeypatch.setenv(var, "0")
    assert enabled()


def test_no_bar_inside_a_spark_task(stderr, monkeypatch):
    stderr(_Terminal())
    monkeypatch.setattr(progress_module, "_in_spark_task", lambda: True)
    assert not enabled()
    assert progress(desc="x", show=True).disable


def test_show_false_hides_the_bar(stderr):
    stderr(_Terminal())
    assert progress(desc="x", show=False).disable


def test_log_lines_go_above_a_drawn_bar_and_handlers_come_back(stderr):
    out = stderr(_Terminal())
    root = logging.getLogger()
    handler = logging.StreamHandler(out)
    root.addHandler(handler)
    try:
        before = list(root.handlers)
        bar = progress(desc="work", total=2)
        assert handler not in root.handlers  # replaced by tqdm's, same stream
        logging.getLogger("patternlake.test").warning("a line while the bar is drawn")
        bar.update(2)
        bar.close()
        assert root.handlers == before
        assert "a line while the bar is drawn" in out.getvalue()
    finally:
        root.removeHandler(handler)

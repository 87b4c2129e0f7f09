"""The driver's bar of the epochs that training processes outside it have checkpointed."""

import io
import threading
from types import SimpleNamespace

from patternlake.training import train


def test_epochs_done_are_read_from_the_newest_checkpoint(tmp_path):
    assert train._checkpointed_epochs(tmp_path / "none") == 0
    assert train._checkpointed_epochs(tmp_path) == 0
    for epoch in (2, 3, 4):
        (tmp_path / f"epoch-{epoch:04d}.pt").write_bytes(b"")
    (tmp_path / "best.pt").write_bytes(b"")
    assert train._checkpointed_epochs(tmp_path) == 5


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_follows_the_run_and_stops_with_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATTERNLAKE_PROGRESS", "1")
    monkeypatch.setattr("sys.stderr", _Terminal())
    spec = SimpleNamespace(checkpoint_dir=str(tmp_path), epochs=10)

    def run():
        (tmp_path / "epoch-0000.pt").write_bytes(b"")
        return {"best": 1}

    assert train._with_epoch_bar(spec, "horovod", run) == {"best": 1}
    assert not any(t.name == "teacher-epochs" for t in threading.enumerate())  # ended with it
    assert train._with_epoch_bar(spec, "single", run) == {"best": 1}  # fit draws its own

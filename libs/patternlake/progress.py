"""Progress bars (tqdm) for the driver loops a person waits on: training epochs, tuning
trials, the students' segments.

A bar is drawn on stderr only when stderr is a terminal, so logs, CI and redirected output
stay free of them; ``PATTERNLAKE_PROGRESS=0`` turns them off on a terminal too (``=1`` forces
them on). Inside a Spark task and in a Horovod or MPI process other than rank 0 there is never
a bar.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterable
from typing import Any

ENV = "PATTERNLAKE_PROGRESS"
_OFF = {"0", "off", "false", "no"}
_ON = {"1", "on", "true", "yes"}
# the rank of a process started by Horovod (gloo), Open MPI, MPICH or torchrun
_RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK")


def enabled() -> bool:
    """True when a bar may be drawn here (see the module's docstring)."""
    if _in_spark_task() or any(os.environ.get(v, "0") != "0" for v in _RANK_VARS):
        return False
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in _OFF:
        return False
    if forced in _ON:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    show: bool = True,
    **kwargs: Any,
) -> Any:
    """A tqdm bar over ``iterable`` (or one updated by hand when it is None); a no-op bar
    (same methods, prints nothing) unless ``show`` and ``enabled()``. While a bar is drawn,
    log lines are printed above it instead of through it; it is removed from the terminal
    when it closes (what it counted goes to the log)."""
    return _bar_class()(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        disable=not (show and enabled()),
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
        **kwargs,
    )


@functools.cache
def _bar_class() -> type:
    """tqdm, imported when first needed, whose drawn bars redirect console logging."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    class Bar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._redirect = None
            if not self.disable:  # the root logger's console handlers write through tqdm
                self._redirect = logging_redirect_tqdm(tqdm_class=tqdm)
                self._redirect.__enter__()

        def close(self) -> None:
            try:
                super().close()
            finally:
                redirect, self._redirect = getattr(self, "_redirect", None), None
                if redirect is not None:
                    redirect.__exit__(None, None, None)

    return Bar


def _in_spark_task() -> bool:
    try:
        from pyspark import TaskContext
    except ImportError:
        return False
    return TaskContext.get() is not None

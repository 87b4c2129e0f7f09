"""Batches prepared off the training thread."""

from __future__ import annotations


def test_prefetch_keeps_order_raises_the_producers_error_and_stops_early():
    import threading

    import pytest

    from patternlake.models.fit import prefetch

    assert list(prefetch(iter(range(50)))) == list(range(50))

    def broken():
        yield 1
        raise ValueError("bad piece")

    with pytest.raises(ValueError, match="bad piece"):
        list(prefetch(broken()))
    before = threading.active_count()
    for i in prefetch(iter(range(10_000)), depth=2):
        if i == 3:
            break
    assert threading.active_count() <= before  # the producer stopped with the loop

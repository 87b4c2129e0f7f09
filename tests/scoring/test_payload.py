"""The key a Python worker caches its built models under."""

from __future__ import annotations

from patternlake.scoring.score import payload_digest


def test_the_worker_cache_key_changes_with_which_segment_gets_the_shared_file():
    base = {"teacher": b"t", "files": {"5": b"shared"}, "students": {1: ("student", "5")}}
    more = {**base, "students": {1: ("student", "5"), 2: ("student", "5")}}
    fewer = {**base, "students": {}}
    keys = {payload_digest(p) for p in (base, more, fewer)}
    assert len(keys) == 3  # the same files, three different servings
    assert payload_digest(dict(base)) == payload_digest(base)

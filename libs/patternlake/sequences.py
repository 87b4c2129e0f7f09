"""The vocabulary of ``user_sequences``, shared by the stages that write and read it
(featurize writes it; training, evaluation, students and scoring read it): defined here
once, never copied into a stage.

* ``gap_seq`` holds time-gap buckets: 0 for a user's first event, then 1 + the number of
  ``GAP_EDGES`` (seconds since the user's previous event) at or below the gap, so
  ``GAP_BUCKETS`` ids in all (0 .. len(GAP_EDGES) + 1).
* The evaluation protocol (DESIGN.md): a user with at least ``MIN_EVALUATED_EVENTS`` events
  is evaluated; the last event is the test target and the one before it the validation
  target (``valid_item`` / ``test_item``), the rest is training data.
"""

from __future__ import annotations

GAP_EDGES = (60, 300, 1800, 7200, 86400, 604800)  # 1 min, 5 min, 30 min, 2 h, 1 day, 1 week
GAP_BUCKETS = len(GAP_EDGES) + 2  # 0 (first) .. 7 (>= a week)
MIN_EVALUATED_EVENTS = 3  # a training event, the validation target and the test target

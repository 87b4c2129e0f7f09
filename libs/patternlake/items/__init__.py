"""The ``item_stats`` stage: per-item popularity and engagement statistics for BI."""

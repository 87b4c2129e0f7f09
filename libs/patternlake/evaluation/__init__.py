"""The evaluate stage: the protocol of DESIGN.md for the registered teacher, its students and
the baselines (``evaluate``)."""

"""The evaluate stage: the protocol of docs/design.md for the registered teacher, its students and
the baselines (``evaluate``); ``transforms`` holds the scorers and report rows, ``evaluate`` the
I/O shell."""

"""Forgetting a user: every row of theirs out of every lake table (``forget``)."""

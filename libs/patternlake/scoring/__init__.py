"""Batch scoring: each user's next items, the rule behind each and the events that explain it."""

"""Times given by users (conf, CLI flags): ISO-8601 text to an aware UTC datetime."""

from __future__ import annotations

from datetime import UTC, datetime


def parse_utc(text: str) -> datetime:
    """ISO-8601 (``Z`` accepted) -> aware datetime in UTC; a time without a zone is UTC.
    Raises ``ValueError`` for anything else (callers name the setting in their error)."""
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)

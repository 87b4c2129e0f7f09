"""Path spellings: ``file:///a/b``, ``file:/a/b`` and ``/a/b`` name the same local file."""

from __future__ import annotations


def strip_file_scheme(path: str) -> str:
    """A ``file:`` URI as a plain local path; any other path or URI is returned as is."""
    for prefix in ("file://", "file:"):
        if path.startswith(prefix):
            return "/" + path[len(prefix) :].lstrip("/")
    return path

"""Named Delta tables under one lake root, behind one interface (see `Lake`)."""

from patternlake.lake.core import Lake, make_engine

__all__ = ["Lake", "make_engine"]

"""Named Delta tables under one lake root, behind one interface (see `Lake`)."""

from patternlake.lake.tables import Lake, batches_in_order, make_engine

__all__ = ["Lake", "batches_in_order", "make_engine"]

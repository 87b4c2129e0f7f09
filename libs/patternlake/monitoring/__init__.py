"""Drift monitoring: is recent data still what the champions were trained on (``drift``)."""

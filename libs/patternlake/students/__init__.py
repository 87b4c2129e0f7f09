"""Students: one small model per user segment, distilled from the teacher (``distill``),
pruned and int8-quantized (``compress``), gated and registered (``registry``)."""

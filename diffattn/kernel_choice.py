"""What `kernels="auto"` resolves to: the fused kernel only where it was measured faster.

Each backend keeps a table of measured speed ratios, MEASURED[key] = {L: composed ms / fused ms},
one entry per shape the kernel tables timed (the key names the attention variant, its map head
dim, the compute dtype and whatever else changes the comparison on that backend). choose() picks
"fused" for a model only when its key is in the table and the ratio at the measured sequence
length nearest the model's max_seq_len (log scale) is above 1; everywhere else, measured slower
or never measured, it picks "composed", the framework's own attention. An unmeasured shape is
not assumed fast: a kernel earns a shape by a committed measurement.
"""
from __future__ import annotations

import math


def nearest_length(lengths, seq_len: int) -> int:
    """The measured length closest to seq_len on a log scale (ties go to the shorter)."""
    return min(sorted(lengths), key=lambda L: abs(math.log(L) - math.log(max(1, seq_len))))


def choose(measured: dict, key, seq_len: int) -> str:
    ratios = measured.get(key)
    if not ratios:
        return "composed"
    return "fused" if ratios[nearest_length(ratios, seq_len)] > 1.0 else "composed"

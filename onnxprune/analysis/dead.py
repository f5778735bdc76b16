"""Dead units: channels, heads and FFN neurons whose removal changes no output.

A :class:`~onnxprune.analysis.removal.PruneGroup` lists, per unit, the ``"in"`` slices -- the
positions of the next Conv / Gemm / MatMul weights that read the unit as a reduction input. The
masked twin of a removal zeros exactly those slices, and removal equals the masked twin to float
tolerance for exact groups (the invariant the structural passes check). So when every ``"in"``
slice of a unit is already **exactly zero** in the model, the masked twin *is* the model and
removing the unit is exact: ``y_pruned = y`` up to float summation order.

Such units appear in models that were pruned by masking before export (soft pruning, a structured
mask that was never compacted) and in models whose training drove whole rows to zero.

Preconditions: the group is exact (not ``approximate``) and its ``"in"`` slices are float
initializers; otherwise no unit is reported dead (a zero quantised value does not dequantise to
zero unless its zero point is zero, and approximate groups are not exact under masking).
"""

from __future__ import annotations

import numpy as np

from onnxprune.analysis.removal import PruneGroup, positions
from onnxprune.ir.model import Model


def dead_units(model: Model, group: PruneGroup, min_keep: int = 1) -> np.ndarray:
    """Sorted indices of the units of ``group`` whose every ``"in"`` slice is exactly zero.

    At most ``width - max(min_keep, 1)`` are returned (the lowest indices), so a group never
    loses all its units. Empty when the group is approximate, has no ``"in"`` slice or reads a
    non-float weight.
    """
    ins = [s for s in group.slices if s.role == "in"]
    if group.approximate or not ins:
        return np.zeros(0, np.int64)
    alive = np.zeros(group.width, dtype=bool)
    units = np.arange(group.width)
    for s in ins:
        arr = model.get_array(s.initializer)
        if arr.dtype.kind != "f":
            return np.zeros(0, np.int64)
        part = np.moveaxis(np.asarray(arr), s.axis, 0)[positions(s, units)]
        alive |= (part.reshape(group.width, -1) != 0).any(axis=1)
    dead = np.flatnonzero(~alive).astype(np.int64)
    return dead[: max(0, group.width - max(min_keep, 1))]

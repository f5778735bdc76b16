"""Test oracles shared by the test suite and the scripts (not used by the passes).

:func:`masked_twin_error` checks a structural removal against its *masked twin*: the same
channels zeroed in the unpruned graph. Removing a channel whose every parameter is zero changes
nothing the graph computes, so the pruned model and the masked twin must agree to float
tolerance on any input (for exact groups; approximate ones are excluded).
"""

from __future__ import annotations

import numpy as np

from onnxprune.analysis.channels.groups import build_groups
from onnxprune.analysis.removal import apply_removal, mask_group
from onnxprune.check import run_model
from onnxprune.ir.model import Model
from onnxprune.pipeline.manager import verify_model


def masked_twin_error(model: Model, group_name: str, channels: np.ndarray, feeds: dict[str, np.ndarray],
                      allow_approximate: bool = False) -> tuple[float, float, dict[str, tuple[tuple[int, ...], ...]]]:
    """The exactness oracle: max |removed - masked twin| over all outputs on ONNX Runtime.

    Builds two copies of ``model``: one with the ``in`` slices of ``channels`` zeroed (the masked
    twin), one with the channels removed, and runs both on ``feeds``.

    Returns:
        The largest absolute difference twin vs removed, the largest difference original vs
        removed (to show the removal mattered), and per output the (twin, removed) shapes.
    """
    twin, pruned = model.copy(), model.copy()
    g_twin = {g.name: g for g in build_groups(twin, allow_approximate)}
    g_pruned = {g.name: g for g in build_groups(pruned, allow_approximate)}
    if group_name not in g_twin:
        raise KeyError(f"no group named {group_name!r}")
    mask_group(twin, g_twin[group_name], channels)
    apply_removal(pruned, [(g_pruned[group_name], channels)])
    verify_model(pruned, "masked_twin_error")
    a, b, orig = run_model(twin, feeds), run_model(pruned, feeds), run_model(model, feeds)
    err = change = 0.0
    shapes = {}
    for k in a:
        shapes[k] = (a[k].shape, b[k].shape)
        if a[k].shape != b[k].shape:
            return float("inf"), float("inf"), shapes
        if a[k].size:
            err = max(err, float(np.abs(a[k].astype(np.float64) - b[k]).max()))
            change = max(change, float(np.abs(orig[k].astype(np.float64) - b[k]).max()))
    return err, change, shapes

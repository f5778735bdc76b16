"""Quantised weights seen through ``DequantizeLinear``: their zero points.

A quantised weight ``q`` with zero point ``z`` dequantises to ``(q - z) * scale``; the value zero
is ``q == z``, so masking a quantised weight writes ``z``, and "is this weight zero" compares
with ``z``, not with 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxprune.errors import PipelineError


def quant_zero_points(model: Any, info: Any) -> np.ndarray | int:
    """Zero point(s) of a weight behind DequantizeLinear, broadcastable to the initializer.

    Per-axis zero points are reshaped along the quantization axis (in the initializer's layout).
    """
    q = info.quant
    if q is None or q.zero_point is None:
        return 0
    zp = np.asarray(model.get_array(q.zero_point))
    if zp.size == 1:
        return zp.reshape(()).item()
    if q.axis is None:
        raise PipelineError(f"weight {info.name!r}: per-axis zero point without a traceable axis")
    shape = [1] * len(info.shape)
    shape[q.axis] = zp.size
    return zp.reshape(shape)

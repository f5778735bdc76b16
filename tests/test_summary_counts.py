"""``summary.nonzero_and_finite``: one chunked read gives numpy's non-zero count and finiteness."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune import summary


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_matches_numpy(dtype: type, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(summary, "_CHUNK", 7)  # several chunks, a ragged last one
    rng = np.random.default_rng(0)
    a = rng.standard_normal(100).astype(dtype)
    a[::3] = 0
    a[4] = -0.0
    a[7] = np.finfo(dtype).tiny / 4  # subnormal: non-zero
    assert summary.nonzero_and_finite(a) == (np.count_nonzero(a), True)
    for bad in (np.nan, np.inf, -np.inf):
        b = a.copy()
        b[50] = bad
        assert summary.nonzero_and_finite(b.reshape(10, 10)) == (np.count_nonzero(b), False)

"""Does 2:4 pay for one GEMM on sparse tensor cores? A measured table, not a guess.

The table holds FP16 kernel-time speedups (dense time / 2:4-sparse time) of ``y = x @ W`` with
``W`` ``[K, N]`` 2:4 along ``K``, measured on an NVIDIA H200 with cuSPARSELt 0.8 through PyTorch
(``scripts/sparse_gemm_check.py``; each GEMM captured in a CUDA graph and replayed), at
``M`` = 512 / 4096 / 16384 tokens:

=============  =====  =====  =====
K x N          512    4096   16384
=============  =====  =====  =====
768 x 768      0.74   0.88   1.18
768 x 3072     0.73   1.16   1.28
3072 x 768     0.88   1.12   1.29
4096 x 4096    1.25   1.47   1.45
4096 x 11008   1.22   1.51   1.46
11008 x 4096   1.18   1.42   1.47
=============  =====  =====  =====

:func:`sparse_gain` estimates a layer's speedup from its nearest measured shape (distance in
``log K`` and ``log N``) and interpolates linearly in ``log M`` between the measured token counts
(clamped at the ends). It is an estimate for the kernel only: TensorRT times dense and sparse
tactics and keeps the faster, and a whole model gains less than its GEMMs (transposes and
non-GEMM ops). A layer is worth 2:4 when the estimate reaches :data:`MIN_GAIN`.
"""

from __future__ import annotations

import math

#: Measured token counts (M) of the table's columns.
TOKENS: tuple[int, ...] = (512, 4096, 16384)

#: (K, N) -> speedups at :data:`TOKENS` (H200, FP16, cuSPARSELt 0.8, kernel time).
H200_FP16: dict[tuple[int, int], tuple[float, float, float]] = {
    (768, 768): (0.74, 0.88, 1.18),
    (768, 3072): (0.73, 1.16, 1.28),
    (3072, 768): (0.88, 1.12, 1.29),
    (4096, 4096): (1.25, 1.47, 1.45),
    (4096, 11008): (1.22, 1.51, 1.46),
    (11008, 4096): (1.18, 1.42, 1.47),
}

#: Smallest estimated speedup for which a layer gets 2:4 (below it the layer stays dense).
MIN_GAIN = 1.05


def sparse_gain(k: int, n: int, tokens: int) -> float:
    """Estimated dense/sparse kernel-time ratio of a ``[tokens, k] x [k, n]`` FP16 GEMM.

    Args:
        k: Reduction length (for a Conv: ``C_in/group * kh * kw``).
        n: Output features.
        tokens: Rows of the activation (batch x sequence, or batch x output pixels).

    Raises:
        ValueError: a non-positive size.
    """
    if min(k, n, tokens) <= 0:
        raise ValueError(f"sizes must be positive, got K={k}, N={n}, tokens={tokens}")
    lk, ln = math.log(k), math.log(n)
    shape = min(H200_FP16, key=lambda s: (math.log(s[0]) - lk) ** 2 + (math.log(s[1]) - ln) ** 2)
    row = H200_FP16[shape]
    lm = math.log(tokens)
    logs = [math.log(t) for t in TOKENS]
    if lm <= logs[0]:
        return row[0]
    if lm >= logs[-1]:
        return row[-1]
    for i in range(len(logs) - 1):
        if logs[i] <= lm <= logs[i + 1]:
            f = (lm - logs[i]) / (logs[i + 1] - logs[i])
            return row[i] + f * (row[i + 1] - row[i])
    return row[-1]  # pragma: no cover - the loop covers the range


def pays(k: int, n: int, tokens: int, min_gain: float = MIN_GAIN) -> bool:
    """Whether 2:4 is expected to make this GEMM at least ``min_gain`` times faster."""
    return sparse_gain(k, n, tokens) >= min_gain

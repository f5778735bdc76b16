"""``com.microsoft`` ``MatMulNBits`` weights: the logical ``[N, K]`` matrix behind the packed blocks.

``Y = X @ Wᵀ`` with ``W [N, K]`` stored block-quantised along K (ONNX Runtime's contrib op, as
ONNX Runtime GenAI's model builder and ``matmul_nbits_quantizer`` write it):

* ``B`` uint8 ``[N, n_blocks, blob]``, ``n_blocks = ceil(K / block_size)``,
  ``blob = block_size * bits / 8``: element ``k = j * block_size + i`` of row ``n`` is the
  ``bits``-wide field ``i % (8 / bits)`` (low bits first) of byte ``B[n, j, i // (8 / bits)]``;
* ``scales`` ``[N * n_blocks]`` (or ``[N, n_blocks]``), one per (row, block);
* optional ``zero_points``: uint8 ``[N * ceil(n_blocks * bits / 8)]`` (packed per row like ``B``,
  padded to whole bytes per row), or float ``[N * n_blocks]`` like the scales; absent means
  ``2^(bits-1)``;
* ``W[n, k] = (q[n, k] - zp[n, j]) * scale[n, j]`` with ``j = k // block_size`` (checked against
  ONNX Runtime 1.32 CPU for bits = 4, integer and float zero points, K not a multiple of the block).

Here a :class:`~onnxprune.analysis.removal.ParamSlice` on ``B`` uses the *logical* axes: axis 0 =
N (output rows, role ``"out"``), axis 1 = K (input positions, role ``"in"``). What each
structural operation needs:

* **remove output rows** -- always exact: drop rows of ``B``, of the scales and of the zero
  points (the row's own bytes), and lower the ``N`` attribute;
* **remove input positions** -- only whole blocks (``k_removal_problem`` says why not
  otherwise: re-quantising a partial block would change the kept values): drop blocks of ``B``,
  columns of the scales and (re-packed) zero points, lower ``K``;
* **zero input positions** (the masked twin) -- whole blocks by a zero scale (exact for any zero
  point), other positions by ``q = zero point`` (needs integer zero points);
* **element masks** (``masks`` / ``nm``) -- ``q = zero point`` per element, so the dequantised
  value is exactly 0; a float zero point that is not an integer code has no such ``q``
  (:func:`element_mask_problem`).

Not supported (refused with the reason): ``g_idx`` (act-order: K positions are permuted between
blocks), bits other than 2, 4 and 8, a weight read by more than one node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.criteria.registry import prune_weight_kn
from onnxprune.errors import PassError
from onnxprune.ir.model import Model

SUPPORTED_BITS = (2, 4, 8)


@dataclass(frozen=True)
class NBitsWeight:
    """One ``MatMulNBits`` node's constant weight and its quantisation tensors.

    Attributes:
        node: Node name.
        weight: ``B`` initializer (uint8 ``[N, n_blocks, blob]``).
        scales: Scale initializer.
        zero_points: Zero-point initializer, or None (``2^(bits-1)``).
        bias: Bias initializer ``[N]`` (input 5), or None.
        g_idx: ``g_idx`` input (input 4), or None.
        K: Input features.
        N: Output features.
        bits: Bits per value.
        block_size: Values per quantisation block along K.
    """

    node: str
    weight: str
    scales: str
    zero_points: str | None
    bias: str | None
    g_idx: str | None
    K: int
    N: int
    bits: int
    block_size: int

    @property
    def n_blocks(self) -> int:
        return -(-self.K // self.block_size)

    @property
    def per_byte(self) -> int:
        return 8 // self.bits


def _input(node: onnx.NodeProto, k: int) -> str | None:
    return node.input[k] if len(node.input) > k and node.input[k] else None


def is_nbits(node: onnx.NodeProto) -> bool:
    """True for a ``com.microsoft`` ``MatMulNBits`` node."""
    return node.op_type == "MatMulNBits" and node.domain == "com.microsoft"


def nbits_of(model: Model, node: onnx.NodeProto) -> NBitsWeight | None:
    """The node's weight description when ``B`` and the scales are initializers (None otherwise)."""
    if not is_nbits(node) or len(node.input) < 3:
        return None
    consts = model.initializer_map()
    inputs = model.graph_input_names()
    b, s = node.input[1], node.input[2]
    if b not in consts or s not in consts or b in inputs or s in inputs:
        return None
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    return NBitsWeight(node.name, b, s, _input(node, 3), _input(node, 5), _input(node, 4),
                       int(attrs.get("K", 0)), int(attrs.get("N", 0)), int(attrs.get("bits", 4)),
                       int(attrs.get("block_size", 0)))


def nbits_weights(model: Model) -> dict[str, NBitsWeight]:
    """Every main-graph ``MatMulNBits`` weight with a constant ``B``, by ``B``'s name."""
    out = {}
    for node in model.graph.node:
        w = nbits_of(model, node)
        if w is not None:
            out.setdefault(w.weight, w)
    return out


def support_problem(model: Model, w: NBitsWeight) -> str | None:
    """Why the weight cannot be read or rewritten here (None: it can)."""
    where = f"MatMulNBits {w.node!r}"
    if w.bits not in SUPPORTED_BITS:
        return f"{where}: bits={w.bits} (supported: {', '.join(map(str, SUPPORTED_BITS))})"
    if w.g_idx:
        return f"{where}: g_idx (act-order) permutes K between blocks"
    if w.K <= 0 or w.N <= 0 or w.block_size < 16 or w.block_size & (w.block_size - 1):
        return f"{where}: attributes K={w.K}, N={w.N}, block_size={w.block_size} are not a valid layout"
    t = model.initializer(w.weight)
    blob = w.block_size * w.bits // 8
    if t is None or t.data_type != onnx.TensorProto.UINT8 or \
            int(np.prod(t.dims, dtype=np.int64)) != w.N * w.n_blocks * blob:
        return f"{where}: B is not uint8 [N={w.N}, {w.n_blocks} blocks, {blob} bytes]"
    s = model.initializer(w.scales)
    if s is None or int(np.prod(s.dims, dtype=np.int64)) != w.N * w.n_blocks:
        return f"{where}: scales do not hold N x n_blocks = {w.N * w.n_blocks} values"
    if w.zero_points:
        z = model.initializer(w.zero_points)
        size = int(np.prod(z.dims, dtype=np.int64)) if z is not None else -1
        want = w.N * -(-w.n_blocks * w.bits // 8) if z is not None and z.data_type == onnx.TensorProto.UINT8 \
            else w.N * w.n_blocks
        if z is None or w.zero_points in model.graph_input_names() or size != want:
            return f"{where}: zero points are not a constant of {want} values"
    users = [n.name for n in model.graph.node if w.weight in n.input]
    if len(users) != 1:
        return f"{where}: B {w.weight!r} is read by {len(users)} nodes"
    return None


# ---------------------------------------------------------------------- (un)packing
def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``[..., bytes]`` uint8 -> ``[..., count]`` codes (low bits first)."""
    per = 8 // bits
    if per == 1:
        return packed[..., :count].copy()
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    vals = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :count]


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """``[..., count]`` codes -> ``[..., ceil(count * bits / 8)]`` uint8 (zero padded)."""
    per = 8 // bits
    if per == 1:
        return codes.astype(np.uint8)
    count = codes.shape[-1]
    pad = (-count) % per
    c = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), codes.dtype)], axis=-1) if pad else codes
    c = c.astype(np.uint8).reshape(*codes.shape[:-1], -1, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint8)


def codes(model: Model, w: NBitsWeight) -> np.ndarray:
    """The quantised values, uint8 ``[N, n_blocks, block_size]`` (padding of the last block included)."""
    b = np.asarray(model.get_array(w.weight)).reshape(w.N, w.n_blocks, -1)
    return _unpack(b, w.bits, w.block_size)


def _write_codes(model: Model, w: NBitsWeight, q: np.ndarray) -> None:
    model.set_array(w.weight, _pack(q, w.bits))


def scales(model: Model, w: NBitsWeight) -> np.ndarray:
    """Scales as ``[N, n_blocks]``."""
    return np.asarray(model.get_array(w.scales)).reshape(w.N, w.n_blocks)


def zero_points(model: Model, w: NBitsWeight) -> np.ndarray:
    """Zero points as ``[N, n_blocks]`` (integer codes, or floats for a float zero-point tensor)."""
    if not w.zero_points:
        return np.full((w.N, w.n_blocks), 1 << (w.bits - 1), dtype=np.uint8)
    z = np.asarray(model.get_array(w.zero_points))
    if z.dtype == np.uint8:
        return _unpack(z.reshape(w.N, -1), w.bits, w.n_blocks)
    return z.reshape(w.N, w.n_blocks)


def dequantize(model: Model, w: NBitsWeight) -> np.ndarray:
    """The logical weight ``W [N, K]`` float32 (``Y = X @ Wᵀ``)."""
    q = codes(model, w).astype(np.float32)
    zp = zero_points(model, w).astype(np.float32)
    s = scales(model, w).astype(np.float32)
    return ((q - zp[..., None]) * s[..., None]).reshape(w.N, -1)[:, :w.K]


def logical_array(model: Model, name: str, weights: dict[str, NBitsWeight] | None = None) -> np.ndarray:
    """``name``'s values in the axes group slices use: the dequantised ``[N, K]`` for a
    ``MatMulNBits`` weight, the initializer itself otherwise."""
    weights = nbits_weights(model) if weights is None else weights
    w = weights.get(name)
    return dequantize(model, w) if w is not None else np.asarray(model.get_array(name))


def logical_shapes(model: Model) -> dict[str, tuple[int, int]]:
    """``(N, K)`` of every ``MatMulNBits`` weight, by ``B``'s name."""
    return {k: (w.N, w.K) for k, w in nbits_weights(model).items()}


# ---------------------------------------------------------------------- element masks
def element_mask_problem(model: Model, w: NBitsWeight) -> str | None:
    """Why single values cannot be set to exactly zero (None: they can, by ``q = zero point``)."""
    problem = support_problem(model, w)
    if problem:
        return problem
    zp = zero_points(model, w)
    if zp.dtype.kind == "f" and not (np.all(zp == np.round(zp)) and zp.min() >= 0 and zp.max() < (1 << w.bits)):
        return (f"MatMulNBits {w.node!r}: float zero points that are not integer codes, so no {w.bits}-bit value "
                "dequantises to exactly 0 (only whole blocks can be zeroed, through their scale)")
    return None


def nonzero_mask(model: Model, w: NBitsWeight) -> np.ndarray:
    """``[N, K]`` bool: values that do not dequantise to zero."""
    q = codes(model, w)
    zp = zero_points(model, w)
    s = scales(model, w)
    nz = (q.astype(np.float64) != zp[..., None].astype(np.float64)) & (s[..., None] != 0)
    return nz.reshape(w.N, -1)[:, :w.K]


def write_keep(model: Model, w: NBitsWeight, keep: np.ndarray) -> None:
    """Set every value outside ``keep`` (``[N, K]`` bool) to its block's zero point (exactly 0).

    Raises:
        PassError: :func:`element_mask_problem`.
    """
    problem = element_mask_problem(model, w)
    if problem:
        raise PassError(problem)
    q = codes(model, w)
    zp = zero_points(model, w).astype(np.uint8)
    full = np.ones((w.N, w.n_blocks * w.block_size), dtype=bool)
    full[:, :w.K] = keep
    full = full.reshape(q.shape)
    _write_codes(model, w, np.where(full, q, zp[..., None]))


def zero_inputs(model: Model, w: NBitsWeight, ks: np.ndarray) -> None:
    """Make input positions ``ks`` contribute nothing (the masked twin of removing them).

    Whole blocks get a zero scale (exact for any zero point); other positions ``q = zero point``.

    Raises:
        PassError: partial blocks with float zero points (:func:`element_mask_problem`).
    """
    ks = np.unique(np.asarray(ks, dtype=np.int64))
    if not ks.size:
        return
    whole, part = _whole_blocks(w, ks)
    if whole.size:
        s = np.array(model.get_array(w.scales))
        s2 = s.reshape(w.N, w.n_blocks)
        s2[:, whole] = 0
        model.set_array(w.scales, s2.reshape(s.shape))
    if part.size:
        keep = np.ones((w.N, w.K), dtype=bool)
        keep[:, part] = False
        write_keep(model, w, keep)


def _block_span(w: NBitsWeight, j: int) -> tuple[int, int]:
    return j * w.block_size, min((j + 1) * w.block_size, w.K)


def _whole_blocks(w: NBitsWeight, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks that ``ks`` covers entirely, and the positions of ``ks`` in the other blocks."""
    blocks = ks // w.block_size
    whole = []
    for j in np.unique(blocks):
        start, end = _block_span(w, int(j))
        if np.count_nonzero(blocks == j) == end - start:
            whole.append(int(j))
    part = ks[~np.isin(blocks, whole)]
    return np.asarray(whole, dtype=np.int64), part


# ---------------------------------------------------------------------- removal
def k_removal_problem(w: NBitsWeight, ks: np.ndarray) -> str | None:
    """Why input positions ``ks`` cannot be removed (None: they are whole blocks)."""
    ks = np.unique(np.asarray(ks, dtype=np.int64))
    if ks.size and (ks[0] < 0 or ks[-1] >= w.K):
        return f"MatMulNBits {w.node!r}: input positions outside K={w.K}"
    _, part = _whole_blocks(w, ks)
    if part.size:
        return (f"MatMulNBits {w.node!r}: removing {ks.size} of its K={w.K} inputs splits quantisation blocks "
                f"of {w.block_size} (first split block starts at {int(part[0]) // w.block_size * w.block_size}); "
                "only whole blocks can be dropped without re-quantising")
    return None


def remove(model: Model, w: NBitsWeight, rows: np.ndarray, ks: np.ndarray) -> int:
    """Drop output rows ``rows`` and input positions ``ks`` (whole blocks) of the weight.

    Rewrites ``B``, the scales, the zero points and the node's ``N`` / ``K`` attributes (the bias
    is an ordinary ``[N]`` slice of its own). Returns the logical parameters removed.

    Raises:
        PassError: :func:`support_problem`, or :func:`k_removal_problem`.
    """
    problem = support_problem(model, w) or k_removal_problem(w, ks)
    if problem:
        raise PassError(problem)
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    ks = np.unique(np.asarray(ks, dtype=np.int64))
    if rows.size and (rows[0] < 0 or rows[-1] >= w.N):
        raise PassError(f"MatMulNBits {w.node!r}: output rows outside N={w.N}")
    drop_blocks, _ = _whole_blocks(w, ks)
    b = np.asarray(model.get_array(w.weight)).reshape(w.N, w.n_blocks, -1)
    s_arr = np.asarray(model.get_array(w.scales))
    s = s_arr.reshape(w.N, w.n_blocks)
    zp = zero_points(model, w) if w.zero_points else None
    b = np.delete(np.delete(b, rows, axis=0), drop_blocks, axis=1)
    s = np.delete(np.delete(s, rows, axis=0), drop_blocks, axis=1)
    n_new, k_new = w.N - rows.size, w.K - ks.size
    model.set_array(w.weight, np.ascontiguousarray(b))
    model.set_array(w.scales, np.ascontiguousarray(s.reshape(-1) if s_arr.ndim == 1 else s))
    if zp is not None:
        zp = np.delete(np.delete(zp, rows, axis=0), drop_blocks, axis=1)
        z_arr = np.asarray(model.get_array(w.zero_points))
        new = _pack(zp, w.bits) if z_arr.dtype == np.uint8 else zp
        model.set_array(w.zero_points, np.ascontiguousarray(new.reshape(-1) if z_arr.ndim == 1 else new))
    node = next(n for n in model.graph.node if n.name == w.node)
    for a in node.attribute:
        if a.name == "N":
            a.i = n_new
        elif a.name == "K":
            a.i = k_new
    return w.N * w.K - n_new * k_new



# ---------------------------------------------------------------------- masks / N:M on the codes
def mask_refusal(model: Model, w: NBitsWeight, criterion: str, refit: bool, nm: tuple[int, int] | None) -> str | None:
    """Why ``masks`` / ``nm`` leave this weight alone (None: it can be masked in its codes)."""
    if criterion != "magnitude":
        return (f"criterion={criterion} is not available for {w.bits}-bit MatMulNBits weights (magnitude only: "
                "SparseGPT's weight updates cannot be held in the codes without re-quantising)")
    if refit:
        return "refit re-solves float weights; MatMulNBits codes are not re-fitted"
    if nm is not None and w.K % nm[1]:
        return f"K={w.K} is not a multiple of m={nm[1]}"
    return element_mask_problem(model, w)


def prune_codes(model: Model, w: NBitsWeight, sparsity: float | None, nm: tuple[int, int] | None,
                options: object = None) -> tuple[int, int]:
    """Mask the weight by magnitude of its dequantised values, in the codes (``q = zero point``).

    N:M groups run along K of the logical ``[N, K]`` weight, for every output row (what sparse
    kernels need); existing zeros are kept. Returns ``(nnz_before, nnz_after)``.
    """
    values = dequantize(model, w)
    keep_before = nonzero_mask(model, w)
    before = int(np.count_nonzero(keep_before))
    keep_kn = keep_before.T if before < keep_before.size else None
    new = prune_weight_kn(values.T, criterion="magnitude", sparsity=sparsity, nm=nm, keep_mask_kn=keep_kn,
                          options=options).T
    keep = (new != 0) & keep_before
    after = int(np.count_nonzero(keep))
    if after != before:
        write_keep(model, w, keep)
    return before, after


__all__ = ["NBitsWeight", "codes", "dequantize", "element_mask_problem", "is_nbits", "k_removal_problem",
           "logical_array", "logical_shapes", "mask_refusal", "nbits_of", "nbits_weights", "nonzero_mask",
           "prune_codes", "remove", "scales", "support_problem", "write_keep", "zero_inputs", "zero_points"]

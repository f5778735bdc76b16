"""Re-fit the layers that read removed channels: the graph side of structured reconstruction.

After a structural removal (channels, attention heads, FFN neurons) every *consumer* -- a
MatMul / Gemm / Conv whose weight has an ``"in"`` slice in a group -- loses the input rows ``R``.
With the consumer's inputs ``x`` (``[T, K]`` over calibration tokens), its weight in ``[K, N]``
layout ``W`` (``y = x W + b``) and the kept rows ``S``, the re-fit solves

    min over W'_S, b'   ‖X W + 1 bᵀ − X_S W'_S − 1 b'ᵀ‖²

by least squares (:func:`onnxprune.criteria.reconstruct.refit`) on the *augmented* input
``x̃ = [x, 1]`` with weight ``[W; b]``, i.e. from ``G̃ = X̃ᵀX̃ = [[XᵀX, T μ], [T μᵀ, T]]`` with
``μ`` the per-channel mean and ``T`` the token count; the bias row is never removed. Two orders:

* **order 1** (``reconstruct=true``): the whole problem above -- kept rows and bias re-solved
  (FLAP / ZipLM / SliceGPT-style), from ``XᵀX``, ``Σx`` and ``T`` of one
  :func:`~onnxprune.analysis.calibration.collect_input_stats` pass (:func:`consumer_stats`). Only
  for MatMul ``x @ W`` with a 2-D weight, Gemm (``transA = 0``) and 1×1 Conv (``group = 1``,
  no padding): their tokens are the rows of ``x`` (for a Conv every ``B·H·W`` position);
* **order 0** (``compensate=true``, and every other supported consumer under ``reconstruct``):
  ``W'_S = W_S`` fixed, so the minimiser is ``b' = b + μ_R W_R`` -- the removed channels' mean
  contribution is folded into the bias (FLAP's compensation). For a k×k Conv the contribution of
  channel ``c`` to output ``o`` is ``μ_c Σ_taps W[o, c, :, :]`` (exact away from zero padding).

A consumer with fewer than ``2 (K + 1)`` calibration rows (a 1×1 Conv after a global pool sees
one row per image) gets the order-0 fit only: least squares would interpolate the calibration
data there rather than generalise.

A bias that does not exist yet is created (Gemm/Conv: a third input; MatMul: an ``Add`` after
it); if another group prunes the consumer's output channels, the new bias joins that group's
slices so it shrinks with them. Removed rows of the weight are left as they are (the removal
deletes them; the masked twin zeroes them).

Preconditions: the groups come from the analysis of ``model`` (their ``"in"`` slices name
float initializers read directly by the consumer); statistics were collected on the model whose
outputs are the target (the dense model for a one-shot re-fit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxprune.analysis.calibration import (
    CalibrationData,
    collect_input_stats,
    cross_stats,
)
from onnxprune.analysis.removal import ParamSlice, PruneGroup, positions
from onnxprune.criteria.reconstruct import refit
from onnxprune.criteria.structured import reconstruction_order
from onnxprune.ir.graph import attr
from onnxprune.ir.model import Model

#: An order-1 re-fit needs at least this many calibration rows per augmented input (else bias only).
MIN_TOKENS_PER_INPUT = 2

__all__ = ["Consumer", "augmented_weight", "consumer_stats", "current_bias", "find_consumers", "group_consumers",
           "kn_weight", "mean_delta", "n_outputs", "reconstruct", "reconstruct_sequential", "removal_curve",
           "removed_rows", "set_bias_delta", "unique_name", "unit_rows", "write_back", "zero_removed"]


@dataclass
class Consumer:
    """A MatMul / Gemm / Conv that reads a group's channels through its weight.

    Attributes:
        node: Node name.
        op: ``MatMul``, ``Gemm`` or ``Conv``.
        weight: The weight initializer.
        k_axis: Axis of ``weight`` that holds the input channels.
        tensor: The activation the weight multiplies.
        axis: Channel axis of ``tensor``.
        alpha: Gemm ``alpha`` (1 otherwise).
        order: ``1`` when a full least-squares re-fit is possible, ``0`` for bias-only.
        why_zero: Why only the bias can be re-fitted (``order == 0``).
        slices: ``(group name, slice)`` for every ``"in"`` slice of a group on this weight.
    """

    node: str
    op: str
    weight: str
    k_axis: int
    tensor: str
    axis: int
    alpha: float = 1.0
    order: int = 1
    why_zero: str = ""
    slices: list[tuple[str, ParamSlice]] = field(default_factory=list)


def _consumer(node: onnx.NodeProto, init: str, arr: np.ndarray) -> Consumer | str:
    """The consumer description for ``node`` reading ``init``, or why it is not supported."""
    op = node.op_type
    if op == "MatMul" and len(node.input) > 1 and node.input[1] == init and arr.ndim == 2:
        return Consumer(node.name, op, init, 0, node.input[0], -1)
    if op == "Gemm" and len(node.input) > 1 and node.input[1] == init and not int(attr(node, "transA", 0)):
        return Consumer(node.name, op, init, 1 if int(attr(node, "transB", 0)) else 0, node.input[0], 1,
                        float(attr(node, "alpha", 1.0)))
    if op == "Conv" and node.input[1] == init and int(attr(node, "group", 1)) == 1 and arr.ndim >= 3:
        c = Consumer(node.name, op, init, 1, node.input[0], 1)
        pads = list(attr(node, "pads", []) or [])
        if int(np.prod(arr.shape[2:])) != 1 or any(pads) or attr(node, "auto_pad", "NOTSET") not in (
                "NOTSET", b"NOTSET", "VALID", b"VALID"):
            c.order, c.why_zero = 0, "k×k or padded Conv: bias-only (im2col re-fit not implemented)"
        return c
    if op == "Conv" and int(attr(node, "group", 1)) != 1:
        return f"grouped Conv {node.name!r} (group={int(attr(node, 'group', 1))}): not re-fitted"
    return f"{op} {node.name!r} reads {init!r} in a way the re-fit does not handle"


def find_consumers(model: Model, groups: list[PruneGroup]) -> tuple[dict[str, Consumer], dict[str, str]]:
    """Consumers of the groups' ``"in"`` slices, keyed by weight name, and the weights skipped (with why).

    A weight is skipped when it is not read directly by exactly one supported node, or is not float.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    inits = model.initializer_map()
    out: dict[str, Consumer] = {}
    skipped: dict[str, str] = {}
    for g in groups:
        for s in g.slices:
            if s.role != "in" or s.initializer in skipped:
                continue
            if s.initializer not in out:
                users = readers.get(s.initializer, [])
                t = inits.get(s.initializer)
                if t is None or len(users) != 1 or onnx.helper.tensor_dtype_to_np_dtype(t.data_type).kind != "f":
                    skipped[s.initializer] = "not a float weight read directly by one node"
                    continue
                c = _consumer(users[0], s.initializer, np.asarray(model.get_array(s.initializer)))
                if isinstance(c, str):
                    skipped[s.initializer] = c
                    continue
                out[s.initializer] = c
            c = out[s.initializer]
            if s.axis != c.k_axis:
                skipped[s.initializer] = f"group {g.name!r} slices {s.initializer!r} on axis {s.axis}, not its inputs"
                del out[s.initializer]
                continue
            c.slices.append((g.name, s))
    return out, skipped


def kn_weight(model: Model, c: Consumer) -> np.ndarray:
    """The consumer's weight as ``[K, N]`` float64 (``[K, N·taps]`` for a Conv), ``alpha`` included."""
    w = np.asarray(model.get_array(c.weight), dtype=np.float64)
    if c.op == "Conv":
        return c.alpha * np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
    return c.alpha * (w.T if c.k_axis == 1 else w)


def _bias_source(model: Model, c: Consumer) -> tuple[str, float] | None:
    """``(initializer, scale)`` of the existing bias ``b = scale · init`` (length N), or None."""
    graph = model.graph
    node = next(n for n in graph.node if n.name == c.node)
    inits = model.initializer_map()
    if c.op in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2] in inits:
        beta = float(attr(node, "beta", 1.0)) if c.op == "Gemm" else 1.0
        return (node.input[2], beta) if beta != 0 else None
    out = node.output[0]
    users = [n for n in graph.node if out in n.input]
    if c.op == "MatMul" and len(users) == 1 and users[0].op_type == "Add" and out not in {o.name for o in graph.output}:
        other = [x for x in users[0].input if x != out]
        if len(other) == 1 and other[0] in inits and model.is_constant(other[0]):
            if len([n for n in graph.node if other[0] in n.input]) == 1:
                return other[0], 1.0
    return None


def current_bias(model: Model, c: Consumer, n_out: int) -> np.ndarray:
    """The consumer's bias as ``[N]`` float64 (zeros when it has none)."""
    src = _bias_source(model, c)
    if src is None:
        return np.zeros(n_out)
    b = np.asarray(model.get_array(src[0]), dtype=np.float64) * src[1]
    return np.broadcast_to(b.reshape(-1) if b.size == n_out else b, (n_out,)).copy()


def set_bias_delta(model: Model, c: Consumer, delta: np.ndarray, live: list[PruneGroup]) -> None:
    """Add ``delta`` ``[N]`` to the consumer's bias, creating one when there is none.

    A created bias joins (role ``param``, tag ``bias``) every group in ``live`` that prunes the
    consumer's output channels, so it shrinks with them.
    """
    graph = model.graph
    node = next(n for n in graph.node if n.name == c.node)
    src = _bias_source(model, c)
    if src is not None:
        arr = np.asarray(model.get_array(src[0]))
        new = np.broadcast_to(arr.reshape(-1) if arr.size == delta.size else arr, delta.shape) + delta / src[1]
        model.set_array(src[0], new.reshape(arr.shape if arr.size == delta.size else delta.shape).astype(arr.dtype))
        return
    dtype = onnx.helper.tensor_dtype_to_np_dtype(model.initializer_map()[c.weight].data_type)
    name = unique_name(model, f"{c.node}.compensation_bias")
    model.add_initializer(name, delta.astype(dtype))
    if c.op in ("Gemm", "Conv"):
        while len(node.input) < 2:
            node.input.append("")
        if len(node.input) == 2:
            node.input.append(name)
        else:
            node.input[2] = name
        if c.op == "Gemm":
            for a in node.attribute:
                if a.name == "beta":
                    a.f = 1.0
    else:
        out = node.output[0]
        pre = unique_name(model, f"{out}.pre_compensation")
        for n in graph.node:  # the producer writes `pre`; a new Add writes the old name
            for i, o in enumerate(n.output):
                if o == out:
                    n.output[i] = pre
        add = onnx.helper.make_node("Add", [pre, name], [out], name=unique_name(model, f"{c.node}.compensation"))
        idx = [i for i, n in enumerate(graph.node) if n.name == c.node][0]
        graph.node.insert(idx + 1, add)
    out_axis = {"MatMul": 1, "Gemm": 1 - c.k_axis, "Conv": 0}[c.op]
    for g in live:
        for sl in list(g.slices):
            if sl.initializer == c.weight and sl.role == "out" and sl.axis == out_axis:
                g.slices.append(ParamSlice(name, 0, "param", sl.offset, sl.block, sl.stride, "bias"))


def unique_name(model: Model, base: str) -> str:
    """``base``, or ``base_k`` for the first ``k`` that no initializer, tensor or node uses."""
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output} | {
        n.name for n in model.graph.node}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def removed_rows(c: Consumer, plan: dict[str, np.ndarray]) -> np.ndarray:
    """Rows (input channels) of the consumer removed by ``plan`` (group name -> removed units)."""
    rows = [positions(s, plan[g]) for g, s in c.slices if g in plan and plan[g].size]
    return np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.int64)


def unit_rows(c: Consumer, group: str, width: int) -> np.ndarray:
    """``[width, block]`` rows of the consumer owned by each unit of ``group``."""
    s = next(s for g, s in c.slices if g == group)
    return positions(s, np.arange(width)).reshape(width, s.block)


def consumer_stats(model: Model, calib: CalibrationData, consumers: list[Consumer],
                   gram: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(G̃ per order-1 input tensor, μ per input tensor)`` from one :func:`collect_input_stats` pass.

    ``G̃ = [[XᵀX, Σx], [Σxᵀ, T]]`` (float64) is the Gram matrix of the augmented input ``[x, 1]``;
    ``μ = Σx / T`` serves the bias-only (order 0) consumers. Padding tokens are excluded.
    ``gram=False``: the means only (sums of squares, no ``XᵀX``).
    """
    acts = {c.tensor: c.axis for c in consumers}
    if not acts:
        return {}, {}
    stats = collect_input_stats(model, calib, acts, kind="hessian" if gram else "sumsq")
    grams, means = {}, {}
    for t in acts:
        st = stats[t]
        n = max(st.tokens, 1)
        means[t] = st.total / n
        if gram and any(c.order == 1 for c in consumers if c.tensor == t):
            k = st.hessian.shape[0]
            G = np.empty((k + 1, k + 1))
            G[:k, :k] = st.hessian
            G[:k, k] = G[k, :k] = st.total
            G[k, k] = st.tokens
            grams[t] = G
    return grams, means


def write_back(model: Model, c: Consumer, W_new: np.ndarray, b_new: np.ndarray, b_old: np.ndarray,
               live: list[PruneGroup]) -> None:
    """Store a re-fitted ``[K, N]`` weight (``alpha`` divided out) and the bias change."""
    arr = np.asarray(model.get_array(c.weight))
    w = W_new / c.alpha
    if c.op == "Conv":
        new = np.moveaxis(w.reshape((arr.shape[1], arr.shape[0], *arr.shape[2:])), 0, 1)
    else:
        new = w.T if c.k_axis == 1 else w
    model.set_array(c.weight, new.astype(arr.dtype))
    delta = b_new - b_old
    if np.any(delta != 0):
        set_bias_delta(model, c, delta, live)


def mean_delta(model: Model, c: Consumer, rows: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Order 0: ``μ_R W_R`` summed over the kernel taps -- the bias change that keeps the mean output."""
    w = kn_weight(model, c)  # [K, N·taps]
    taps = max(w.shape[1] // max(_n_out(model, c), 1), 1)
    contrib = mean[rows] @ w[rows]
    return contrib.reshape(-1, taps).sum(axis=1)


def _n_out(model: Model, c: Consumer) -> int:
    shape = model.initializer_map()[c.weight].dims
    return int(shape[0]) if c.op == "Conv" else int(shape[1 - c.k_axis] if c.op == "Gemm" else shape[1])


def n_outputs(model: Model, c: Consumer) -> int:
    """N, the consumer's output channels."""
    return _n_out(model, c)


# ---------------------------------------------------------------------- selection and re-fit
def group_consumers(consumers: dict[str, Consumer], group: str) -> list[Consumer]:
    """The consumers reading ``group``'s channels."""
    return [c for c in consumers.values() if any(g == group for g, _ in c.slices)]


def augmented_weight(model: Model, c: Consumer) -> np.ndarray:
    """``[W; b]`` ``[K + 1, N]`` float64: the consumer's ``[K, N]`` weight with its bias as the last row."""
    w = kn_weight(model, c)
    return np.vstack([w, current_bias(model, c, w.shape[1])[None, :]])


def removal_curve(model: Model, group: PruneGroup, consumers: dict[str, Consumer], grams: dict[str, np.ndarray],
                  n_max: int, percdamp: float) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Greedy reconstruction-error order of ``group``'s units (:func:`~onnxprune.criteria.structured.reconstruction_order`).

    Returns ``(order, cumulative error, reference ‖X̃ W̃‖²)``, or None when the group's channels
    are not read by exactly one order-1 consumer that reads no other group (then the pass's
    fallback score is used).
    """
    cs = group_consumers(consumers, group.name)
    if len(cs) != 1 or cs[0].order != 1 or cs[0].tensor not in grams or len({g for g, _ in cs[0].slices}) != 1:
        return None
    c = cs[0]
    G, W = grams[c.tensor], augmented_weight(model, c)
    if n_max == 0:
        return np.zeros(0, np.int64), np.zeros(0), float(np.einsum("kn,kn->", W, G @ W))
    order, costs = reconstruction_order(G, W, unit_rows(c, group.name, group.width), n_max, percdamp=percdamp)
    return order, costs, float(np.einsum("kn,kn->", W, G @ W))


def reconstruct(model: Model, consumers: dict[str, Consumer], plan: dict[str, np.ndarray],
                grams: dict[str, np.ndarray], means: dict[str, np.ndarray], live: list[PruneGroup], *,
                order: int, damp: float) -> dict[str, Any]:
    """Re-fit every consumer that loses rows under ``plan`` (group name -> removed units), in place.

    ``order=1``: least-squares re-fit of kept rows and bias (:func:`onnxprune.criteria.reconstruct.refit`)
    where the consumer allows it, bias-only elsewhere; ``order=0``: bias-only everywhere.

    Returns:
        Stats: ``refitted`` / ``biases_compensated`` counts and, for the re-fitted consumers,
        the summed relative calibration error before (mean compensation not included) and after.
    """
    refitted = compensated = few = 0
    before = after = 0.0
    per_layer: dict[str, dict[str, float]] = {}
    for c in consumers.values():
        rows = removed_rows(c, plan)
        if not rows.size:
            continue
        full = order == 1 and c.order == 1 and c.tensor in grams
        if full and grams[c.tensor][-1, -1] < MIN_TOKENS_PER_INPUT * grams[c.tensor].shape[0]:
            full, few = False, few + 1  # too few calibration rows to determine the kept inputs: bias only
        if full:
            W = augmented_weight(model, c)
            mask = np.ones(W.shape, dtype=bool)
            mask[rows] = False
            W_new, info = refit(W, mask, grams[c.tensor], damp=damp)
            write_back(model, c, W_new[:-1], W_new[-1], W[-1], live)
            refitted += 1
            before += info.rel_before
            after += info.rel_after
            per_layer[c.node] = {"rel_before": round(info.rel_before, 6), "rel_after": round(info.rel_after, 6),
                                  "seconds": round(info.seconds, 3)}
        elif c.tensor in means:
            set_bias_delta(model, c, mean_delta(model, c, rows, means[c.tensor]), live)
            compensated += 1
    out: dict[str, Any] = {"biases_compensated": compensated}
    if order == 1:
        out.update(refitted=refitted, bias_only_few_tokens=few, refit_rel_error_before=round(before, 6), refit_rel_error_after=round(after, 6),
                   refit_layers=per_layer)
    return out


def _augment(S: np.ndarray, s_left: np.ndarray, s_right: np.ndarray, n: float) -> np.ndarray:
    """``[[S, s_left], [s_rightᵀ, n]]``: a cross Gram matrix of ``[x, 1]`` and ``[x', 1]``."""
    a, b = S.shape
    out = np.empty((a + 1, b + 1))
    out[:a, :b] = S
    out[:a, b] = s_left
    out[a, :b] = s_right
    out[a, b] = n
    return out


def zero_removed(model: Model, plan: list[tuple[PruneGroup, np.ndarray]]) -> None:
    """Zero the ``"in"`` slices of ``plan`` in place (float initializers): the masked twin, in ``model``."""
    for g, ch in plan:
        for s in g.slices:
            if s.role != "in":
                continue
            arr = np.array(model.get_array(s.initializer))
            if arr.dtype.kind != "f":
                continue
            idx = [slice(None)] * arr.ndim
            idx[s.axis] = positions(s, ch)
            arr[tuple(idx)] = 0
            model.set_array(s.initializer, arr)


def reconstruct_sequential(model: Model, calib: CalibrationData, consumers: dict[str, Consumer],
                           plan: list[tuple[PruneGroup, np.ndarray]], means: dict[str, np.ndarray],
                           live: list[PruneGroup], *, damp: float) -> dict[str, Any]:
    """Sequential re-fit: each consumer, in graph order, fitted on the inputs of the model pruned so far.

    ``model`` is copied (the dense reference ``X_d``), then the removal is applied as zeroed
    ``"in"`` rows (:func:`zero_removed`; exact for exact groups). For every order-1 consumer in
    graph order, :func:`~onnxprune.analysis.calibration.cross_stats` streams the calibration data
    through the dense copy and ``model`` (whose earlier consumers are already re-fitted) and the
    consumer solves ``min ‖X̃_d W̃_dense − X̃_p W̃'‖²`` with ``G = X̃_pᵀX̃_p``, ``C = X̃_pᵀX̃_d`` and
    ``D = X̃_dᵀX̃_d`` (augmented by the ones column): later layers correct what earlier removals
    changed. Order-0 consumers get the bias-only fit from the dense means ``means``.
    One calibration pass per re-fitted consumer.
    """
    dense = model.copy()
    zero_removed(model, plan)
    removed = {g.name: c for g, c in plan}
    position = {n.name: i for i, n in enumerate(model.graph.node)}
    refitted = compensated = few = 0
    per_layer: dict[str, dict[str, float]] = {}
    for c in sorted(consumers.values(), key=lambda c: position.get(c.node, 0)):
        rows = removed_rows(c, removed)
        if not rows.size:
            continue
        if c.order == 1:
            W = augmented_weight(dense, c)
            st = cross_stats(dense, model, calib, [(c.tensor, c.tensor, c.axis)])[c.tensor]
            if st.tokens >= MIN_TOKENS_PER_INPUT * (st.G.shape[0] + 1):
                G = _augment(st.G, st.sum_p, st.sum_p, st.tokens)
                C = _augment(st.C, st.sum_p, st.sum_d, st.tokens)
                D = _augment(st.D, st.sum_d, st.sum_d, st.tokens)
                mask = np.ones(W.shape, dtype=bool)
                mask[rows] = False
                W_new, info = refit(W, mask, G, C, D, damp=damp)
                b_now = augmented_weight(model, c)[-1]
                write_back(model, c, W_new[:-1], W_new[-1], b_now, live)
                refitted += 1
                per_layer[c.node] = {"rel_before": round(info.rel_before, 6), "rel_after": round(info.rel_after, 6),
                                  "seconds": round(info.seconds, 3)}
                continue
            few += 1
        if c.tensor in means:
            set_bias_delta(model, c, mean_delta(dense, c, rows, means[c.tensor]), live)
            compensated += 1
    return {"biases_compensated": compensated, "refitted": refitted, "bias_only_few_tokens": few,
            "refit_layers": per_layer}

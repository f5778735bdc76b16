"""Static tensor shapes for the attention/FFN group search (:func:`static_shapes`).

Dynamic input dims are fixed (:data:`DEFAULT_DIMS` unless given; for a decoder with a KV cache
the consistent :func:`~onnxprune.analysis.kvcache.llm_dims`), then ONNX shape inference
(with data propagation) runs on a weight-less shell of the model; tensors it leaves open can be
measured on one ONNX Runtime run on neutral inputs (:func:`shapes_from_ort`). Head and channel
counts must be static for a group to be found; batch and sequence dims only need *some* value.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnxprune.analysis.kvcache import llm_dims
from onnxprune.ir.graph import copy_without_initializers, make_shell, node_outer_reads
from onnxprune.ir.model import Model

#: Same logger name as before the split, so log filters keep matching.
log = logging.getLogger("onnxprune.analysis.heads.groups")


#: Values given to dynamic input dimensions for static shape inference (axis 0, other axes).
DEFAULT_DIMS = (2, 7)


def static_shapes(model: Model, dims: dict[str, int] | None = None,
                  run_missing: bool = True) -> dict[str, list[int] | None]:
    """Static shapes of every tensor, with dynamic input dims fixed.

    A dynamic dim named ``d`` takes ``dims[d]`` if given, else :data:`DEFAULT_DIMS` (axis 0 or
    other axes; the first value seen for a name is reused). Dims that inference cannot resolve
    come back as ``None`` entries inside the list; unknown ranks as ``None``. With
    ``run_missing``, tensors that inference leaves open are measured on one ONNX Runtime run
    (external weights are read; meant for models that fit in memory).
    """
    shell = make_shell(model.proto)
    dims = {**llm_dims(model), **(dims or {})}  # a KV-cache decoder: batch 1, past + new = total
    inits = {t.name for t in shell.graph.initializer}
    for vi in shell.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            key = d.dim_param or f"{vi.name}:{axis}"
            if key not in dims:
                dims[key] = DEFAULT_DIMS[0] if axis == 0 else DEFAULT_DIMS[1]
            d.Clear()
            d.dim_value = dims[key]
    del shell.graph.value_info[:]
    for o in shell.graph.output:  # let inference fill the outputs from scratch
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(shell, strict_mode=False, data_prop=True)
    except Exception as exc:  # pragma: no cover - inference failures are model specific
        log.warning("shape inference failed: %s", exc)
        inferred = shell
    out: dict[str, list[int] | None] = {}
    vis = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    for vi in vis:
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is None or not tt.HasField("shape"):
            out.setdefault(vi.name, None)
            continue
        out[vi.name] = [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]
    for t in model.graph.initializer:
        out[t.name] = [int(d) for d in t.dims]
    produced = [o for n in model.graph.node for o in n.output if o]
    missing = [o for o in produced if out.get(o) is None or any(d is None for d in out[o] or [])]
    if missing and run_missing:
        out.update(shapes_from_ort(model, shell, missing))
    return out


def shape_slice(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The part of ``proto`` that computes ``names``: their producers and everything upstream.

    Tensors that shape inference leaves open are mostly the rotary tables and causal masks built
    from ``Range(0, sequence)``, which read no weight; running only this slice keeps the one
    ONNX Runtime run off the model's weights (it used to run the whole model, reading every one).
    Graph inputs stay (feeds are made for all of them); outputs become ``names``.
    """
    producer = {o: i for i, n in enumerate(proto.graph.node) for o in n.output if o}
    needed: set[str] = set(names)
    nodes: set[int] = set()
    stack = [producer[n] for n in names if n in producer]
    while stack:
        i = stack.pop()
        if i in nodes:
            continue
        nodes.add(i)
        node = proto.graph.node[i]
        reads = [x for x in node.input if x] + [x for x in node_outer_reads(node)]
        needed.update(reads)
        stack.extend(producer[x] for x in reads if x in producer)
    out = copy_without_initializers(proto)
    graph = out.graph
    dropped = {t.name for t in proto.graph.initializer} - needed
    inputs = [vi for vi in graph.input if vi.name not in dropped]  # IR < 4 lists initializers as inputs
    del graph.node[:], graph.value_info[:], graph.output[:], graph.input[:]
    graph.input.extend(inputs)
    graph.node.extend(proto.graph.node[i] for i in sorted(nodes))
    graph.initializer.extend(t for t in proto.graph.initializer if t.name in needed)
    graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return out


def shapes_from_ort(model: Model, shell: onnx.ModelProto, names: list[str]) -> dict[str, list[int]]:
    """Shapes of ``names`` from one ONNX Runtime run on neutral inputs of the fixed dims.

    Float inputs are standard normal, ``*mask*`` integer inputs ones, other integer inputs
    zeros (valid token / position ids for any vocabulary).
    """
    import onnxruntime as ort

    proto = shape_slice(model.proto, names)
    feeds: dict[str, np.ndarray] = {}
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    for vi in shell.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [int(d.dim_value) for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_ or "mask" in vi.name.lower():
            feeds[vi.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        kept = {t.name for t in proto.graph.initializer}
        refs = {k: v for k, v in model.external.items() if k in kept}
        if refs:  # mapped weights: ONNX Runtime reads them where they lie (no copy written)
            from onnxprune.check import make_session

            sess = make_session(Model(proto, model.path, model.base_dir, refs), optimize=False)
        else:
            sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = sess.run(names, feeds)
    except Exception as exc:  # the model may not run on neutral inputs; shapes stay unknown
        log.info("shape capture on ONNX Runtime failed: %s", exc)
        return {}
    return {n: [int(d) for d in np.shape(v)] for n, v in zip(names, outs)}

"""Normalise a graph for the channel analysis without changing what it computes.

:func:`prepare` names unnamed nodes, turns Constant nodes into initializers, folds small
constant subgraphs (:func:`fold_constants`), makes equal Splits explicit and gives each
per-channel constant (bias, scale) reader its own copy; every shape input (Reshape target, Split
sizes, Slice bounds, Resize sizes, Expand shape) gets its own copy of the whole int chain it is
built from -- Concat / Unsqueeze / Cast ... nodes cloned, int pieces copied
(:func:`~onnxprune.analysis.removal.privatize_shape_sources`) -- so one Reshape's target can
shrink without touching another's, even when an exporter builds every target from one shared
``[head_dim]`` piece. Shared weights stay shared and tie their readers' channels. :func:`infer_shapes` runs ONNX shape inference on a weightless shell.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np
import onnx

from onnxprune.analysis.removal import privatize_shape_sources
from onnxprune.ir.constants import hoist_constants
from onnxprune.ir.graph import attr, make_shell
from onnxprune.ir.model import Model
from onnxprune.ir.save import scratch_cwd

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------- preparation
#: Shared float constants up to this size are duplicated per use by :func:`prepare`.
UNSHARE_MAX_ELEMENTS = 1 << 22


_SHAPE_INPUTS = {"Reshape": (1,), "Split": (1,), "Slice": (1, 2, 3, 4), "Resize": (3,), "Expand": (1,)}


def infer_shapes(model: Model) -> dict[str, list[int | None] | None]:
    shell = make_shell(model.proto)
    shell.ir_version = max(shell.ir_version, 4)  # IR 3 inference ignores initializers not listed as inputs
    try:
        inferred = onnx.shape_inference.infer_shapes(shell, data_prop=True)
    except Exception as exc:  # inference is best effort here
        log.debug("shape inference failed: %s", exc)
        inferred = shell
    shapes = _read_shapes(inferred.graph)
    try:  # ONNX Runtime's symbolic inference resolves more (e.g. -1 in attention Reshapes)
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference


        with scratch_cwd():  # on incomplete inference ORT dumps sym_shape_infer_temp.onnx into the cwd
            sym = _read_shapes(SymbolicShapeInference.infer_shapes(shell, auto_merge=True).graph)
    except Exception as exc:  # optional: unknown ops or exotic graphs
        log.debug("symbolic shape inference failed: %s", exc)
        sym = {}
    for name, dims in sym.items():
        cur = shapes.get(name)
        if dims is None:
            continue
        if cur is None or len(cur) != len(dims):
            if cur is None:
                shapes[name] = dims
            continue
        shapes[name] = [c if c is not None else d for c, d in zip(cur, dims)]
    return shapes


def _read_shapes(g: onnx.GraphProto) -> dict[str, list[int | None] | None]:
    shapes: dict[str, list[int | None] | None] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            shapes[vi.name] = None
            continue
        shapes[vi.name] = [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]
    return shapes


def prepare(model: Model) -> bool:
    """Make a model ready for analysis without changing what it computes.

    Names unnamed nodes, turns ``Constant`` nodes into initializers, folds small constant
    subgraphs, gives equal Splits explicit sizes, gives each shape-constant input (Reshape target,
    Split sizes, Slice bounds, Resize sizes, Expand shape) its own copy of the int chain it is built
    from (:func:`~onnxprune.analysis.removal.privatize_shape_sources`), and duplicates
    per-channel float constants (at most one axis longer than 1, up to
    :data:`UNSHARE_MAX_ELEMENTS` elements: biases, scales, BN statistics) that several nodes read,
    so exporter de-duplication of equal tensors does not tie unrelated channels. Shared weights
    (two or more axes longer than 1) are not copied: their readers' channels are tied instead,
    so a pruned model never holds two pruned copies of one weight. Callers merge copies that stay
    identical back with :func:`onnxprune.analysis.removal.reshare`. Returns True if anything
    changed.
    """
    g = model.graph
    changed = False
    names = {n.name for n in g.node if n.name}
    inits = {t.name for t in g.initializer}
    counter = 0

    def fresh(base: str) -> str:
        nonlocal counter
        while True:
            counter += 1
            cand = f"{base}_{counter}"
            if cand not in names and cand not in inits:
                return cand

    for n in g.node:
        if not n.name:
            n.name = fresh(n.op_type)
            names.add(n.name)
            changed = True
    seen: set[str] = set()
    for n in g.node:  # duplicate node names break attribute edits
        if n.name in seen:
            n.name = fresh(n.name)
            changed = True
        seen.add(n.name)
    hoisted = hoist_constants(model)
    inits.update(hoisted)
    changed |= bool(hoisted)
    changed |= fold_constants(model)
    changed |= _explicit_splits(model, fresh)
    uses: dict[str, int] = defaultdict(int)
    for n in g.node:
        for x in n.input:
            uses[x] += 1
    # float constants used by several nodes (exporters dedupe equal tensors, e.g. zero biases):
    # give each use its own copy so unrelated channel spaces are not tied together
    for n in g.node:
        for i, x in enumerate(n.input):
            t = model.initializer(x) if uses.get(x, 0) > 1 and x in inits else None
            if t is None or x in model.graph_input_names() or \
                    onnx.helper.tensor_dtype_to_np_dtype(t.data_type).kind != "f" or \
                    not 1 < int(np.prod(t.dims, dtype=np.int64)) <= UNSHARE_MAX_ELEMENTS or \
                    sum(int(d) > 1 for d in t.dims) > 1:  # scalars carry no channels; shared weights stay tied
                continue
            new = fresh(x)
            model.add_initializer(new, np.asarray(model.get_array(x)))
            inits.add(new)
            uses[x] -= 1
            n.input[i] = new
            changed = True
    # every shape input gets its own chain of int pieces (Concat of shared [head_dim] constants...)
    changed |= privatize_shape_sources(model, _SHAPE_INPUTS) > 0
    return changed


#: Ops never folded: folding would dequantise or copy weights, or depends on run-time state.
_NO_FOLD = {"DequantizeLinear", "QuantizeLinear", "RandomNormal", "RandomUniform", "RandomNormalLike",
            "RandomUniformLike", "Multinomial", "Bernoulli", "Loop", "If", "Scan"}


FOLD_MAX_ELEMENTS = 1 << 20


def fold_constants(model: Model) -> bool:
    """Replace nodes whose inputs are all small constants by initializers (e.g. Unsqueeze of a
    BN scale), so per-channel constants reach the rules as initializers."""
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    consts = {t.name for t in g.initializer} - (model.graph_input_names() if model.proto.ir_version >= 4 else set())
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in g.initializer}
    outputs = {o.name for o in g.output}
    folded: list[int] = []
    opset = [onnx.helper.make_opsetid(i.domain, i.version) for i in model.proto.opset_import]
    for idx, n in enumerate(g.node):
        ins = [x for x in n.input if x]
        if n.domain not in ("", "ai.onnx") or n.op_type in _NO_FOLD or not ins or any(x not in consts for x in ins) \
                or any(o in outputs for o in n.output) or sum(sizes.get(x, 0) for x in ins) > FOLD_MAX_ELEMENTS \
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            continue
        try:
            sub = onnx.helper.make_model(
                onnx.helper.make_graph([n], "fold", [], [onnx.helper.make_empty_tensor_value_info(o) for o in n.output if o],
                                       [model.initializer(x) for x in dict.fromkeys(ins)]),
                opset_imports=opset)
            vals = ReferenceEvaluator(sub).run(None, {})
        except Exception:  # an op the reference evaluator cannot run: leave it
            continue
        for o, v in zip([o for o in n.output if o], vals):
            arr = np.asarray(v)
            model.add_initializer(o, arr)
            consts.add(o)
            sizes[o] = int(arr.size)
        folded.append(idx)
    for idx in reversed(folded):
        del g.node[idx]
    return bool(folded)


def _explicit_splits(model: Model, fresh: Any) -> bool:
    g = model.graph
    opset = model.opset
    todo = [n for n in g.node if n.op_type == "Split"]
    if not todo:
        return False
    shapes = infer_shapes(model)
    changed = False
    for n in todo:
        has_sizes = (len(n.input) > 1 and n.input[1]) if opset >= 13 else attr(n, "split") is not None
        if has_sizes:
            continue
        d = shapes.get(n.input[0])
        if d is None:
            continue
        ax = attr(n, "axis", 0) % len(d)
        size = d[ax]
        k = len(n.output)
        if size is None:
            continue
        if opset >= 18 and attr(n, "num_outputs") is not None:
            chunk = -(-size // k)
            sizes = [chunk] * (k - 1) + [size - chunk * (k - 1)]
        else:
            if size % k:
                continue
            sizes = [size // k] * k
        if opset >= 13:
            name = fresh(f"{n.name}.split")
            model.add_initializer(name, np.array(sizes, dtype=np.int64))
            while len(n.input) < 2:
                n.input.append("")
            n.input[1] = name
            for i, a in enumerate(n.attribute):
                if a.name == "num_outputs":
                    del n.attribute[i]
                    break
        else:
            n.attribute.append(onnx.helper.make_attribute("split", sizes))
        changed = True
    return changed

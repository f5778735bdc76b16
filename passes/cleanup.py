"""Pass ``cleanup``: dead-code removal and constant folding of shape subgraphs.

Uses onnx-graphsurgeon: ``fold_constants`` (with ``fold_shapes``, so ``Shape -> Gather ->
Concat -> Reshape`` chains whose dims are static become constants), then ``cleanup`` (dead nodes,
unused initializers) and ``toposort``. Large weights never pass through graph-surgeon: before
folding, every initializer over ``keep_bytes`` (and every external one, and every one that is also a
graph input, since it may be overridden at run time, and every one that an If/Loop/Scan body reads,
which graph-surgeon would otherwise copy into the body) is presented to it as a graph input and
re-attached unchanged afterwards, so the pass neither copies nor folds big
weights (folding a Transpose of a weight would duplicate it). Outputs are unchanged by
construction; the manager's checker and shape inference run afterwards.

Two rewrites are ours, not graph-surgeon's (:mod:`onnxprune.ir.inline`): an ``Identity`` that
reads an initializer is removed and its readers read the initializer (graph-surgeon would fold a
copy of the weight per Identity, so parameters never grow), and ``If`` nodes whose condition is
constant (before or after folding) are replaced by the branch they take, inserted at the If's
position with clashing names renamed and the If's output names kept (graph-surgeon's own
flattening is off: it produced nodes out of topological order on nested Ifs). A ``ConstantOfShape``
that folding turned into a dense tensor (an LSTM's zero initial state) becomes a ``ConstantOfShape``
of the folded, constant shape again, so cleanup never grows parameters or the file. Folding runs again
after an inlining, at most ``MAX_ROUNDS`` times, since an inlined branch may expose more constants. When nothing would be
removed or folded (graph-surgeon only reordered the nodes), the model is left untouched and the
pass reports ``modified=False``, so cleanup is idempotent and a no-op on clean models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.ir.graph import make_shell, node_outer_reads, shell_input
from onnxprune.ir.inline import inline_constant_ifs, share_identity_initializers
from onnxprune.ir.model import Model
from onnxprune.ir.tensors import nbytes, numel
from onnxprune.pipeline.base import Pass, PassContext, PassResult
from onnxprune.pipeline.registry import register_pass

log = logging.getLogger(__name__)

#: Fold / inline rounds at most (an inlined branch may expose more constants).
MAX_ROUNDS = 3


@dataclass
class CleanupOptions:
    """Options of ``cleanup``."""

    fold_constants: bool = field(default=True, metadata={"help": "fold constant subgraphs (ONNX Runtime)"})
    fold_shapes: bool = field(default=True, metadata={"help": "fold Shape-derived subgraphs where dims are static"})
    max_fold_mb: float = field(default=16.0, metadata={"help": "largest constant (MB) folding may create",
                                                        "min": 0.0})


@register_pass
class CleanupPass(Pass):
    """Remove dead nodes/initializers and fold constant (shape) subgraphs."""

    name = "cleanup"
    description = "remove dead nodes and initializers, fold constant shape subgraphs (graph-surgeon)"
    Options = CleanupOptions

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Fold and clean ``model`` in place."""
        graph = model.graph
        nodes_before = len(graph.node)
        inits_before = len(graph.initializer)
        overridable = {i.name for i in graph.input}  # initializers that are graph inputs are not constants
        # graph-surgeon would copy constants that If/Loop/Scan bodies read into those bodies; keep them outside
        pinned = overridable | _subgraph_reads(graph) | set(model.external)
        # an Identity that hands a weight to a graph output stays; folding it would copy the weight
        outputs = {o.name for o in graph.output}
        pinned |= {n.input[0] for n in graph.node if n.op_type == "Identity" and n.input and n.output[0] in outputs}
        big = {t.name for t in graph.initializer if shell_input(t, pinned)}
        big_protos = {t.name: t for t in graph.initializer if t.name in big}
        shell = make_shell(model.proto, force_inputs=pinned)
        share_identity_initializers(shell.graph, {t.name for t in graph.initializer} - overridable)
        scalars = {t.name: numpy_helper.to_array(t) for t in big_protos.values()
                   if t.name not in overridable and nbytes(t) <= 8 and t.data_location != onnx.TensorProto.EXTERNAL}
        inline_constant_ifs(shell.graph, protected=overridable, constants=scalars)
        out = shell
        for _ in range(MAX_ROUNDS):
            fills = {n.output[0]: n for n in out.graph.node if n.op_type == "ConstantOfShape" and n.output}
            out = self._fold(out, ctx)
            _refill(out.graph, fills)
            if not inline_constant_ifs(out.graph, protected=overridable, constants=scalars):
                break
        new_graph = out.graph
        used: set[str] = set()
        for n in new_graph.node:
            used.update(x for x in n.input if x)
        used |= {o.name for o in new_graph.output}
        used |= _subgraph_reads(new_graph)
        # drop the stand-in inputs, re-attach the big initializers that are still used
        orig_inputs = [i.name for i in graph.input]
        fake = big - set(orig_inputs)
        inputs = [i for i in new_graph.input if i.name not in fake]
        small_inits = [t for t in new_graph.initializer if t.name not in big]
        keep_external = {n for n in big_protos if n in used or n in orig_inputs}
        if _is_noop(graph, new_graph, inputs, small_inits, keep_external, big):
            # nothing removed or folded (graph-surgeon may only have reordered): leave the model untouched
            n_init = len(graph.initializer)
            ctx.warn("cleanup: nothing to fold or remove (no constant subgraph, dead node, unused initializer or "
                     "constant-condition If); the model is left as it was")
            return PassResult(model, False, {"nodes_before": nodes_before, "nodes_after": nodes_before,
                                             "initializers_before": inits_before, "initializers_after": n_init})
        del graph.node[:]
        graph.node.extend(new_graph.node)
        del graph.input[:]
        graph.input.extend(inputs)
        # delete in place (no copies of big weights), then add the small/folded ones
        for i in reversed(range(len(graph.initializer))):
            if graph.initializer[i].name not in keep_external:
                del graph.initializer[i]
        graph.initializer.extend(small_inits)
        for name in list(model.external):
            if name not in keep_external:
                model.external.pop(name)
        del graph.value_info[:]
        stats = {
            "nodes_before": nodes_before, "nodes_after": len(graph.node),
            "initializers_before": inits_before, "initializers_after": len(graph.initializer),
        }
        # not a no-op (checked above): a fold or an inlined If, possibly only inside a subgraph
        return PassResult(model, True, stats)


    def _fold(self, proto: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        """One graph-surgeon round: fold constants (no If flattening), remove dead code, sort."""
        import onnx_graphsurgeon as gs

        opts: CleanupOptions = self.options
        g = gs.import_onnx(proto)
        if opts.fold_constants:
            import onnxruntime as ort

            ort.set_default_logger_severity(3)  # graph-surgeon's folding session is noisy
            try:
                g.fold_constants(fold_shapes=opts.fold_shapes, size_threshold=int(opts.max_fold_mb * (1 << 20)),
                                 error_ok=True, flatten_subgraphs=False)
            except Exception as exc:  # graph-surgeon can fail on exotic graphs; folding is optional
                ctx.warn(f"cleanup: constant folding skipped ({type(exc).__name__}: {exc})")
        g.cleanup(remove_unused_graph_inputs=False).toposort()
        return gs.export_onnx(g, do_type_check=False)


def _is_noop(graph: onnx.GraphProto, new_graph: onnx.GraphProto, inputs: list[onnx.ValueInfoProto],
             small_inits: list[onnx.TensorProto], kept_big: set[str], big: set[str]) -> bool:
    """True if the cleaned graph holds exactly the original nodes (in any order), inputs and
    initializers, i.e. cleanup would change nothing but the order of nodes."""
    def key(msgs: list) -> list[bytes]:
        return sorted(m.SerializeToString(deterministic=True) for m in msgs)

    if key(list(graph.node)) != key(list(new_graph.node)):
        return False
    if [i.name for i in graph.input] != [i.name for i in inputs]:
        return False
    if {t.name for t in graph.initializer if t.name in big} != kept_big & big:
        return False
    return key([t for t in graph.initializer if t.name not in big]) == key(small_inits)


def _refill(graph: onnx.GraphProto, fills: dict[str, onnx.NodeProto]) -> None:
    """Turn folded ``ConstantOfShape`` outputs back into a ``ConstantOfShape`` of a constant shape.

    Folding materialises e.g. an LSTM's zero initial state as a dense initializer: parameters and
    file size would grow for nothing. The fill value is the original node's; only the shape is
    folded (an int64 initializer ``<name>__shape``). Scalars stay folded.
    """
    for i in reversed(range(len(graph.initializer))):
        t = graph.initializer[i]
        if t.name not in fills or numel(t) <= 1:
            continue
        shape = numpy_helper.from_array(np.asarray(t.dims, dtype=np.int64), f"{t.name}__shape")
        node = onnx.NodeProto()
        node.CopyFrom(fills[t.name])
        del node.input[:]
        node.input.append(shape.name)
        del graph.initializer[i]
        graph.initializer.append(shape)
        graph.node.insert(0, node)


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for n in graph.node:
        names.update(node_outer_reads(n))
    return names


__all__ = ["CleanupOptions", "CleanupPass"]

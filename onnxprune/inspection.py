"""``onnxprune inspect``: what a model holds, as a JSON document or terminal tables.

Without a mode flag the text output is the overview: header, parameter counts, op counts, the
graph inputs and outputs (shapes, dynamic dims), every initializer of more than one element and
the prunable weights. A mode (``--nm N:M``, ``--groups``, ``--tensorrt``) prints the one header
line and only the part asked for. Weights are named by the node that consumes them beside the
initializer (:func:`onnxprune.analysis.weights.weight_label`): exporters name initializers
``onnx::MatMul_922`` but nodes ``/encoder/layer.3/intermediate/dense/MatMul``. Reasons longer than
a column are footnoted once (:class:`onnxprune.fmt.Footnotes`) instead of repeated on every row.

JSON always holds the whole document (summary, inputs/outputs, weights, and each mode asked for).
``dims`` (``--dim NAME=VALUE``) must name dynamic dims of the model; they resolve the I/O shapes
shown and the FLOP counts of ``--tensorrt``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from onnxprune.analysis.weights import hoist_constant_weights, weight_nodes
from onnxprune.errors import OnnxPruneError
from onnxprune.fmt import fmt_bytes, shorten
from onnxprune.ir.io import check_dim_names, format_io, graph_io
from onnxprune.ir.model import Model
from onnxprune.summary import summarize

__all__ = ["InspectRequest", "format_initializers", "inspect_document", "inspect_text"]

#: Width of the node / initializer columns before names are shortened (from the left: the end of
#: an exported name, ``layer.3/intermediate/dense/MatMul``, is the part that tells rows apart).
NAME_WIDTH = 52


@dataclass
class InspectRequest:
    """What ``inspect`` was asked for."""

    nm: tuple[int, int] | None = None
    groups: bool = False
    tensorrt: bool = False
    dims: Mapping[str, int] = field(default_factory=dict)

    @property
    def modes(self) -> bool:
        """True when a mode flag narrows the text output to its section."""
        return bool(self.nm or self.groups or self.tensorrt)


def _section(module: str, build: str, fmt: str) -> tuple[Any, Any]:
    try:
        mod = importlib.import_module(module)
        return getattr(mod, build), getattr(mod, fmt)
    except (ImportError, AttributeError):
        raise OnnxPruneError(f"this build of onnxprune has no {module}.{build}; the option is not available") from None


def _sections(req: InspectRequest) -> list[tuple[str, str, str, str, tuple[Any, ...]]]:
    out: list[tuple[str, str, str, str, tuple[Any, ...]]] = [
        ("weights", "onnxprune.analysis.weights", "inspect_weights", "format_weights", ())]
    if req.nm:
        out.append(("nm", "onnxprune.tensorrt.eligibility", "inspect_nm", "format_nm", req.nm))
    if req.groups:
        out.append(("groups", "onnxprune.analysis.channels.groups", "inspect_groups", "format_groups", ()))
    if req.tensorrt:
        out.append(("tensorrt", "onnxprune.tensorrt.eligibility", "inspect_tensorrt", "format_tensorrt",
                    (dict(req.dims),) if req.dims else ()))
    return out


def _available(req: InspectRequest) -> list[tuple[str, Any, Any, tuple[Any, ...]]]:
    """``(key, builder, formatter, extra args)`` of each section; the base weights listing is left
    out quietly where this build lacks it, a requested mode raises."""
    out = []
    for key, module, build, fmt, extra in _sections(req):
        try:
            builder, formatter = _section(module, build, fmt)
        except OnnxPruneError:
            if key == "weights":
                continue
            raise
        out.append((key, builder, formatter, extra))
    return out


def _prepare(model: Model, path: str, req: InspectRequest) -> tuple[Any, dict[str, Any]]:
    if req.dims:
        check_dim_names(req.dims, [(path, model.graph)])
    summary = summarize(model, path, per_initializer=True)
    hoist_constant_weights(model)  # in memory only: Constant-node weights are listed like initializers
    nodes = weight_nodes(model)
    for r in summary.per_initializer:
        r["node"] = nodes.get(r["name"])
    ins, outs = graph_io(model.graph)
    doc: dict[str, Any] = {"model": path, "opset": model.opset, "ir_version": model.proto.ir_version,
                           "producer": model.proto.producer_name, "summary": summary.to_dict(),
                           "inputs": [s.to_dict() for s in ins], "outputs": [s.to_dict() for s in outs]}
    return summary, doc


def inspect_document(model: Model, path: str, req: InspectRequest) -> dict[str, Any]:
    """The JSON document of ``inspect --json``.

    Raises:
        OnnxPruneError: a ``--dim`` name the model lacks, or a mode this build does not have.
    """
    _, doc = _prepare(model, path, req)
    for key, builder, _, extra in _available(req):
        doc[key] = builder(model, *extra)
    return doc


def format_initializers(rows: list[dict[str, Any]]) -> str:
    """Initializers of more than one element: consuming node, initializer, shape, dtype, sparsity."""
    rows = [r for r in rows if r["size"] > 1]
    if not rows:
        return "initializers: none with more than one element"
    head = f"{'node (consumer)':<{NAME_WIDTH}} {'initializer':<40} {'shape':<18} {'dtype':<8} {'sparsity':>8}"
    lines = [f"initializers: {len(rows)}", head, "-" * len(head)]
    for r in rows:
        node = r.get("node") or "-"
        lines.append(f"{shorten(node, NAME_WIDTH):<{NAME_WIDTH}} {shorten(r['name'], 40):<40} {str(r['shape']):<18} "
                     f"{r['dtype']:<8} {r['sparsity']:>8.2%}")
    return "\n".join(lines)


def inspect_text(model: Model, path: str, req: InspectRequest) -> str:
    """The terminal output of ``inspect`` (see the module docstring for what each mode prints).

    Raises:
        OnnxPruneError: a ``--dim`` name the model lacks, or a mode this build does not have.
    """
    s, doc = _prepare(model, path, req)
    lines = [f"{path}: opset {model.opset}, IR {model.proto.ir_version}, producer "
             f"{model.proto.producer_name or '-'} {model.proto.producer_version or ''}".rstrip()]
    texts = [formatter(builder(model, *extra)) for key, builder, formatter, extra in _available(req)
             if not (key == "weights" and req.modes)]
    if not req.modes:
        lines.append(f"nodes {s.nodes:,}  parameters {s.parameters:,}  non-zero {s.nonzero:,}  "
                     f"sparsity {s.sparsity:.2%}  file {fmt_bytes(s.file_size)}")
        lines.append("ops: " + ", ".join(f"{k}×{v}" for k, v in sorted(s.ops.items(), key=lambda kv: -kv[1])))
        ins, outs = graph_io(model.graph)
        lines += ["", format_io(ins, outs, req.dims), "", format_initializers(s.per_initializer)]
    for t in texts:
        lines += ["", t]
    return "\n".join(lines)


"""A model's graph inputs and outputs: names, element types, shapes and dynamic dimensions.

A dimension of a graph input or output is either fixed (``dim_value``, an int), named
(``dim_param``, a string such as ``batch``; every tensor with that name shares its value at run
time) or unnamed (neither; ``None``). Initializers listed among the graph inputs (IR < 4
exporters) are not inputs a caller feeds and are left out.

:func:`check_dim_names` is what ``--dim NAME=VALUE`` goes through: a name no input or output of
the model uses would be silently ignored, so it is an error naming the dims the model has.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import onnx

from onnxprune.errors import OnnxPruneError

__all__ = ["TensorSig", "check_dim_names", "dim_names", "format_io", "graph_io"]


@dataclass(frozen=True)
class TensorSig:
    """One graph input or output.

    Attributes:
        name: The tensor name.
        dtype: ONNX element type name (``FLOAT``, ``INT64``...) or the value kind (``sequence``...).
        shape: Per axis an int (fixed), a str (named dynamic dim) or None (unnamed dynamic dim);
            None when the type has no shape at all (unknown rank).
    """

    name: str
    dtype: str
    shape: tuple[int | str | None, ...] | None

    @property
    def dynamic(self) -> list[str]:
        """Named dynamic dims, in axis order (``?`` for an unnamed one)."""
        return [d if isinstance(d, str) else "?" for d in (self.shape or ()) if not isinstance(d, int)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"name": self.name, "dtype": self.dtype,
                "shape": None if self.shape is None else list(self.shape), "dynamic": self.dynamic}


def _sig(v: onnx.ValueInfoProto) -> TensorSig:
    t = v.type
    kind = t.WhichOneof("value")
    if kind != "tensor_type":
        return TensorSig(v.name, kind or "unknown", None)
    tt = t.tensor_type
    dtype = onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type else "UNDEFINED"
    if not tt.HasField("shape"):
        return TensorSig(v.name, dtype, None)
    shape: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            shape.append(int(d.dim_value))
        elif d.dim_param:
            shape.append(d.dim_param)
        else:
            shape.append(None)
    return TensorSig(v.name, dtype, tuple(shape))


def graph_io(graph: onnx.GraphProto) -> tuple[list[TensorSig], list[TensorSig]]:
    """The graph's real inputs (initializers excluded) and its outputs, in declaration order."""
    inits = {t.name for t in graph.initializer}
    return [_sig(v) for v in graph.input if v.name not in inits], [_sig(v) for v in graph.output]


def dim_names(graph: onnx.GraphProto) -> set[str]:
    """Every named dynamic dim of the graph's inputs and outputs."""
    ins, outs = graph_io(graph)
    return {d for s in ins + outs for d in (s.shape or ()) if isinstance(d, str)}


def check_dim_names(dims: Mapping[str, int], graphs: Iterable[tuple[str, onnx.GraphProto]]) -> None:
    """Refuse ``--dim`` names that no given model uses.

    Args:
        dims: ``--dim`` values, name -> size.
        graphs: ``(label, graph)`` pairs; a name is accepted when any of them uses it.

    Raises:
        OnnxPruneError: a name matches no dynamic dim; the message lists the dims there are.
    """
    graphs = list(graphs)
    have: set[str] = set()
    for _, g in graphs:
        have |= dim_names(g)
    unknown = sorted(set(dims) - have)
    if unknown:
        where = " / ".join(label for label, _ in graphs)
        listed = ", ".join(sorted(have)) if have else "none (every dim is fixed or unnamed)"
        raise OnnxPruneError(f"--dim {', '.join(unknown)}: {where} has no dynamic dim of that name; "
                             f"its named dims are: {listed}")


def _shape_text(shape: tuple[int | str | None, ...] | None, dims: Mapping[str, int]) -> str:
    if shape is None:
        return "unknown rank"
    parts = []
    for d in shape:
        if isinstance(d, int):
            parts.append(str(d))
        elif d is None:
            parts.append("?")
        else:
            parts.append(f"{d}={dims[d]}" if d in dims else d)
    return "[" + ", ".join(parts) + "]"


def format_io(inputs: list[TensorSig], outputs: list[TensorSig], dims: Mapping[str, int] | None = None) -> str:
    """The inputs/outputs table of ``onnxprune inspect`` (named dims shown as ``name=value`` when given)."""
    dims = dict(dims or {})
    rows = [("input", s) for s in inputs] + [("output", s) for s in outputs]
    w = max([len(s.name) for _, s in rows] + [4])
    lines = [f"{'':<6} {'name':<{w}} {'dtype':<8} shape"]
    for kind, s in rows:
        lines.append(f"{kind:<6} {s.name:<{w}} {s.dtype:<8} {_shape_text(s.shape, dims)}")
    dyn = sorted({d for _, s in rows for d in (s.shape or ()) if isinstance(d, str)})
    if dyn:
        lines.append("dynamic dims: " + ", ".join(dyn) + " (set them with --dim NAME=VALUE)")
    if any(d is None for _, s in rows for d in (s.shape or ())):
        lines.append("?: an unnamed dynamic dim (any size)")
    return "\n".join(lines)

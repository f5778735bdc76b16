"""Pure helpers for TensorRT emission: shapes option, optimization profiles, trtexec, log parsing.

Nothing here imports ``tensorrt``; the ``tensorrt`` pass and the CLI use these, and they are
tested everywhere.

**Shapes option.** ``"name:MIN/OPT/MAX;name2:..."`` where each shape is written like trtexec's,
dims joined by ``x`` (``input_ids:1x16/8x128/32x512``); a single shape (``name:1x128``) fixes
min = opt = max.

**Profile derivation.** TensorRT needs one optimization profile covering every input with a
dynamic dimension. For each graph input (initializers excluded) with a dynamic dim, the profile is

1. the shapes given for that input (checked: same rank, static dims unchanged, min ≤ opt ≤ max);
2. otherwise per dimension: a symbolic dim (``dim_param``) that another input's given shape
   already fixed takes the same min/opt/max (so ``input_ids`` and ``attention_mask`` stay
   consistent); else the defaults :data:`DEFAULT_BATCH` for axis 0 and :data:`DEFAULT_DIM` for
   any other axis.

**Builder log.** TensorRT writes (INFO) ``(Sparsity) Layers eligible for sparse math: a, b, c``
and ``(Sparsity) TRT inference plan picked sparse implementation for layers: b``; the layer lists
are comma-separated. **Engine inspector.** With detailed profiling verbosity the inspector's JSON
marks layers whose weights TensorRT treated as sparse with ``"HasSparseWeights": 1``; the chosen
kernel's ``TacticName`` contains ``sparse`` when a sparse kernel won.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from onnxprune.errors import PipelineError

#: Default (min, opt, max) of a dynamic batch axis (axis 0).
DEFAULT_BATCH: tuple[int, int, int] = (1, 1, 8)


#: Default (min, opt, max) of any other dynamic axis (sequence length, image side).
DEFAULT_DIM: tuple[int, int, int] = (1, 128, 512)


Shape = tuple[int, ...]


Profile = dict[str, tuple[Shape, Shape, Shape]]


Dim = int | str | None


# ---------------------------------------------------------------------- shapes option
def _parse_shape(text: str, where: str) -> Shape:
    text = text.strip()
    if not text:
        raise PipelineError(f"{where}: empty shape")
    parts = re.split(r"[x,]", text)
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise PipelineError(f"{where}: {text!r} is not a shape like 1x128") from None
    if any(d <= 0 for d in dims):
        raise PipelineError(f"{where}: dims must be positive, got {text!r}")
    return dims


def parse_shapes(text: str) -> Profile:
    """Parse ``"name:min/opt/max;..."`` into ``{name: (min, opt, max)}``.

    Raises:
        PipelineError: malformed entry, repeated input, ranks that differ, or not min ≤ opt ≤ max.
    """
    out: Profile = {}
    if not text or not text.strip():
        return out
    for entry in text.split(";"):
        entry = entry.strip()
        if not entry:
            continue
        if ":" not in entry:
            raise PipelineError(f"tensorrt: option shapes: {entry!r} needs name:min/opt/max")
        name, spec = entry.rsplit(":", 1)
        name = name.strip()
        where = f"tensorrt: option shapes: input {name!r}"
        if not name:
            raise PipelineError(f"tensorrt: option shapes: {entry!r} has no input name")
        if name in out:
            raise PipelineError(f"{where} given twice")
        parts = spec.split("/")
        if len(parts) == 1:
            parts = parts * 3
        if len(parts) != 3:
            raise PipelineError(f"{where}: expected min/opt/max, got {spec!r}")
        lo, opt, hi = (_parse_shape(p, where) for p in parts)
        if not len(lo) == len(opt) == len(hi):
            raise PipelineError(f"{where}: min/opt/max have different ranks")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise PipelineError(f"{where}: needs min <= opt <= max on every axis, got {spec!r}")
        out[name] = (lo, opt, hi)
    return out


def format_shape(shape: Sequence[int]) -> str:
    """``(1, 128)`` -> ``"1x128"``."""
    return "x".join(str(int(d)) for d in shape)


# ---------------------------------------------------------------------- profiles
def is_dynamic(dims: Sequence[Dim]) -> bool:
    """True if any dim is symbolic or unknown."""
    return any(not (isinstance(d, int) and d > 0) for d in dims)


def derive_profile(inputs: Sequence[tuple[str, Sequence[Dim]]], given: Mapping[str, tuple[Shape, Shape, Shape]] | None = None,
                   default_batch: tuple[int, int, int] = DEFAULT_BATCH,
                   default_dim: tuple[int, int, int] = DEFAULT_DIM) -> Profile:
    """One optimization profile for the dynamic inputs (see the module docstring).

    Args:
        inputs: ``(name, dims)`` per graph input; a dim is an int, a ``dim_param`` name or None.
        given: Parsed ``shapes`` option.
        default_batch: (min, opt, max) of an unfixed dynamic axis 0.
        default_dim: (min, opt, max) of any other unfixed dynamic axis.

    Returns:
        ``{name: (min, opt, max)}`` for every input that has a dynamic dim or was given. Fully
        static inputs are left out unless given.

    Raises:
        PipelineError: a given input does not exist, has the wrong rank, or changes a static dim.
    """
    given = dict(given or {})
    by_name = {n: list(d) for n, d in inputs}
    unknown = [n for n in given if n not in by_name]
    if unknown:
        raise PipelineError(f"tensorrt: option shapes names unknown input(s) {', '.join(unknown)}; "
                            f"the model's inputs are {', '.join(by_name) or 'none'}")
    learned: dict[str, tuple[int, int, int]] = {}
    for name, (lo, opt, hi) in given.items():
        dims = by_name[name]
        if len(dims) != len(lo):
            raise PipelineError(f"tensorrt: option shapes: input {name!r} has rank {len(dims)}, "
                                f"the shape given has rank {len(lo)}")
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0 and not (lo[axis] == opt[axis] == hi[axis] == d):
                raise PipelineError(f"tensorrt: option shapes: input {name!r} axis {axis} is fixed at {d} "
                                    f"in the model, the shape given says {lo[axis]}/{opt[axis]}/{hi[axis]}")
            if isinstance(d, str) and d:
                learned.setdefault(d, (lo[axis], opt[axis], hi[axis]))
    profile: Profile = {}
    for name, dims in by_name.items():
        if name in given:
            profile[name] = given[name]
            continue
        if not is_dynamic(dims):
            continue
        lo_l, opt_l, hi_l = [], [], []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                trip = (d, d, d)
            elif isinstance(d, str) and d in learned:
                trip = learned[d]
            else:
                trip = default_batch if axis == 0 else default_dim
            lo_l.append(trip[0])
            opt_l.append(trip[1])
            hi_l.append(trip[2])
        profile[name] = (tuple(lo_l), tuple(opt_l), tuple(hi_l))
    return profile


def graph_input_dims(proto: Any) -> list[tuple[str, list[Dim]]]:
    """``(name, dims)`` of an ONNX model's real inputs (initializers excluded)."""
    inits = {t.name for t in proto.graph.initializer}
    out = []
    for vi in proto.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        dims: list[Dim] = []
        for d in vi.type.tensor_type.shape.dim:
            dims.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None))
        out.append((vi.name, dims))
    return out


# ---------------------------------------------------------------------- trtexec
@dataclass
class BuildSettings:
    """What an engine build needs besides the network."""

    onnx_path: str
    engine_path: str
    sparse: bool = True
    workspace_mb: int = 4096
    opt_level: int = 3
    profile: Profile = field(default_factory=dict)
    timing_cache: str | None = None
    layer_info_path: str | None = None
    strongly_typed: bool = True


def _trt_name(name: str) -> str:
    """trtexec wants names holding ':' or ',' wrapped in single quotes ('input:0')."""
    return f"'{name}'" if any(c in name for c in ":,") else name


def trtexec_args(s: BuildSettings) -> list[str]:
    """The trtexec argument list equivalent to a Python-API build with these settings.

    ``--stronglyTyped`` makes TensorRT 10 keep the ONNX file's precisions (TensorRT 11 is always
    strongly typed); ``--sparsity=enable`` is ``BuilderFlag.SPARSE_WEIGHTS``.
    """
    args = ["trtexec", f"--onnx={s.onnx_path}", f"--saveEngine={s.engine_path}"]
    if s.sparse:
        args.append("--sparsity=enable")
    if s.strongly_typed:
        args.append("--stronglyTyped")
    args.append(f"--memPoolSize=workspace:{int(s.workspace_mb)}M")
    args.append(f"--builderOptimizationLevel={int(s.opt_level)}")
    if s.profile:
        for flag, i in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            args.append(f"{flag}=" + ",".join(f"{_trt_name(n)}:{format_shape(p[i])}" for n, p in s.profile.items()))
    if s.timing_cache:
        args.append(f"--timingCacheFile={s.timing_cache}")
    args.append("--profilingVerbosity=detailed")
    if s.layer_info_path:
        args.append(f"--exportLayerInfo={s.layer_info_path}")
    return args


def trtexec_command(s: BuildSettings) -> str:
    """:func:`trtexec_args` as one shell-quoted line."""
    return shlex.join(trtexec_args(s))


# ---------------------------------------------------------------------- builder log
_ELIGIBLE_RX = re.compile(r"\(Sparsity\)\s*Layers eligible for sparse math:\s*(.*)$")


_PICKED_RX = re.compile(r"\(Sparsity\)\s*TRT inference plan picked sparse implementation for layers:\s*(.*)$")


def _split_layers(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_builder_log(lines: Iterable[str]) -> dict[str, list[str]]:
    """Layers TensorRT found eligible for sparse math and those it built with sparse kernels.

    Args:
        lines: Builder log messages (one per item; items may hold several lines).

    Returns:
        ``{"eligible": [...], "picked_sparse": [...]}`` in log order, without duplicates.
    """
    eligible: dict[str, None] = {}
    picked: dict[str, None] = {}
    for item in lines:
        for line in str(item).splitlines():
            m = _ELIGIBLE_RX.search(line)
            if m:
                eligible.update(dict.fromkeys(_split_layers(m.group(1))))
                continue
            m = _PICKED_RX.search(line)
            if m:
                picked.update(dict.fromkeys(_split_layers(m.group(1))))
    return {"eligible": list(eligible), "picked_sparse": list(picked)}


# ---------------------------------------------------------------------- engine inspector
def _layer_dicts(data: Any) -> list[Any]:
    if isinstance(data, (bytes, str)):
        data = json.loads(data)
    if isinstance(data, Mapping):
        if "Layers" in data:
            return [json.loads(x) if isinstance(x, str) and x.lstrip().startswith("{") else x for x in data["Layers"]]
        return [data]
    if isinstance(data, Sequence):
        return [json.loads(x) if isinstance(x, (str, bytes)) and str(x).lstrip().startswith("{") else x for x in data]
    raise ValueError("inspector data must be JSON text, a dict with 'Layers', or a list of layers")


def parse_inspector(data: Any) -> list[dict[str, Any]]:
    """Per-layer sparse facts from engine-inspector JSON.

    Args:
        data: The whole-engine JSON (text or dict with ``"Layers"``), or a list of per-layer JSON
            texts / dicts (``get_layer_information(i, LayerInformationFormat.JSON)``). Layers given
            as bare names (non-detailed verbosity) carry no sparse information.

    Returns:
        ``[{"name", "type", "tactic", "has_sparse_weights", "sparse_tactic"}]``.

    Raises:
        ValueError: the data is not inspector JSON.
    """
    out = []
    for layer in _layer_dicts(data):
        if not isinstance(layer, Mapping):
            out.append({"name": str(layer), "type": None, "tactic": None, "has_sparse_weights": None,
                        "sparse_tactic": None})
            continue
        tactic = layer.get("TacticName") or layer.get("Tactic") or None
        hsw = layer.get("HasSparseWeights")
        out.append({
            "name": str(layer.get("Name", "")),
            "type": layer.get("LayerType"),
            "tactic": str(tactic) if tactic is not None else None,
            "has_sparse_weights": None if hsw is None else bool(int(hsw)),
            "sparse_tactic": None if tactic is None else "sparse" in str(tactic).lower(),
        })
    return out


def sparsity_summary(log: Mapping[str, list[str]], layers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine builder-log and inspector facts.

    A layer is *eligible* if the log lists it or the inspector marks ``HasSparseWeights``; it
    *ran sparse* if the log says a sparse implementation was picked or its tactic is a sparse one.
    """
    eligible = dict.fromkeys(log.get("eligible", []))
    eligible.update(dict.fromkeys(layer["name"] for layer in layers if layer.get("has_sparse_weights")))
    picked = dict.fromkeys(log.get("picked_sparse", []))
    picked.update(dict.fromkeys(layer["name"] for layer in layers if layer.get("sparse_tactic")))
    return {
        "eligible_layers": list(eligible),
        "sparse_layers": list(picked),
        "eligible_count": len(eligible),
        "sparse_count": len(picked),
        "eligible_not_sparse": [n for n in eligible if n not in picked],
    }

"""KV-cache graph inputs and outputs of decoder graphs (ONNX Runtime GenAI model builder, optimum).

Decoders exported for generation take the cache of earlier steps as graph inputs
(``past_key_values.N.key`` / ``.value``, ``[batch, kv_heads, past_sequence_length, head_size]``)
and return the grown cache as graph outputs (``present.N.key`` / ``.value``). Removing KV heads
changes their declared head dimension, so the structural passes rewrite those declarations (and
say so); everything that runs such a graph needs inputs whose lengths agree:
``total_sequence_length = past_sequence_length + sequence_length`` for the attention mask.

* :func:`kv_inputs` / :func:`kv_outputs` -- the cache tensors (by name: ``past`` / ``present``,
  rank 4 for inputs);
* :func:`llm_dims` -- values for the symbolic dims of such a graph (batch 1, sequence 4, past 5,
  total 9 by default: ONNX Runtime's CPU ``GroupQueryAttention`` needs batch 1 when a prompt of
  several tokens comes with a past);
* :func:`llm_feeds` -- one consistent feed: token ids inside the embedding table, positions
  ``past .. past + seq - 1``, an all-ones mask, a *random, non-empty* past cache;
* :func:`record_kept` / :func:`kept_map` -- the structural passes write into the model's metadata
  (``onnxprune.kv_cache_kept``) which positions of each cache tensor's axis they kept, composed
  over passes, relative to the original graph;
* :func:`fit_cache_feeds` -- a feed of the dense graph cut down for a pruned graph: the kept heads
  when the map is there, else the first ones (enough for shape/finiteness checks).

Nothing here imports the checks or the passes; they import this.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

#: Symbolic-dim values used for decoder graphs: batch, new tokens, cached tokens.
LLM_BATCH, LLM_SEQ, LLM_PAST = 1, 4, 5


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if tt is None or not tt.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def _is_float(vi: onnx.ValueInfoProto) -> bool:
    return vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in (
        onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


def is_cache_name(name: str, kind: str) -> bool:
    """True for a cache tensor name: ``past*`` inputs, ``present*`` outputs (or ``*cache*`` key/value)."""
    n = name.lower()
    word = "past" if kind == "input" else "present"
    return word in n or ("cache" in n and ("key" in n or "value" in n))


def _graph_inputs(owner: Any) -> list[onnx.ValueInfoProto]:
    graph = owner.graph
    inits = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def kv_inputs(owner: Any) -> list[onnx.ValueInfoProto]:
    """Graph inputs of ``owner`` (a Model or ModelProto) that hold a KV cache (float, rank 4)."""
    return [i for i in _graph_inputs(owner) if is_cache_name(i.name, "input") and _is_float(i)
            and (d := _dims(i)) is not None and len(d) == 4]


def kv_outputs(owner: Any) -> list[onnx.ValueInfoProto]:
    """Graph outputs of ``owner`` that return a KV cache."""
    return [o for o in owner.graph.output if is_cache_name(o.name, "output")]


def has_kv_cache(owner: Any) -> bool:
    """True when ``owner`` takes a KV cache as graph input."""
    return bool(kv_inputs(owner))


def declared_dims(owner: Any, name: str) -> list[int | str | None] | None:
    """Declared dims of a graph input or output (ints, symbolic names or None)."""
    for vi in list(owner.graph.input) + list(owner.graph.output):
        if vi.name == name:
            return _dims(vi)
    return None


def llm_dims(owner: Any, batch: int = LLM_BATCH, seq: int = LLM_SEQ, past: int = LLM_PAST) -> dict[str, int]:
    """Values of the symbolic dims of a decoder graph with a KV cache ({} for other graphs).

    The cache inputs' axis 0 is the batch and axis 2 the past length; axis 1 of integer
    ``[batch, n]`` inputs is the new-token count, except for ``*mask*`` inputs, whose length is
    ``past + seq``.
    """
    kv = kv_inputs(owner)
    if not kv:
        return {}
    out: dict[str, int] = {}
    for vi in kv:
        d = _dims(vi) or []
        for axis, value in ((0, batch), (2, past)):
            if isinstance(d[axis], str):
                out.setdefault(d[axis], value)
    kv_names = {vi.name for vi in kv}
    for vi in _graph_inputs(owner):
        d = _dims(vi)
        if not d or vi.name in kv_names or _is_float(vi):
            continue
        if isinstance(d[0], str):
            out.setdefault(d[0], batch)
        if len(d) >= 2 and isinstance(d[1], str):
            out.setdefault(d[1], past + seq if "mask" in vi.name.lower() else seq)
    return out


def _id_bound(owner: Any, name: str) -> int:
    """Rows of the constant table a Gather looks ``name`` up in (100 if none)."""
    tables = {t.name: int(t.dims[0]) for t in owner.graph.initializer if len(t.dims) >= 1}
    for n in owner.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == name and n.input[0] in tables:
            return tables[n.input[0]]
    return 100


def llm_feeds(owner: Any, seed: int = 0, batch: int = LLM_BATCH, seq: int = LLM_SEQ,
              past: int = LLM_PAST) -> dict[str, np.ndarray] | None:
    """One consistent feed for a decoder graph with a KV cache, or None for other graphs.

    Float inputs (the cache included) are standard normal, ``*mask*`` inputs ones, ``*position*``
    inputs ``past + arange(seq)``, ``*seqlens*`` inputs ``past + seq - 1`` and ``*total*``
    scalars ``past + seq`` (raw ``GroupQueryAttention`` inputs), other integers token ids inside
    the embedding table.
    """
    if not has_kv_cache(owner):
        return None
    rng = np.random.default_rng(seed)
    named = llm_dims(owner, batch, seq, past)
    total = past + seq
    feeds: dict[str, np.ndarray] = {}
    for vi in _graph_inputs(owner):
        d = _dims(vi) or []
        shape = [v if isinstance(v, int) else named.get(v, batch if axis == 0 else seq)  # type: ignore[arg-type]
                 for axis, v in enumerate(d)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        lname = vi.name.lower()
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_ or "mask" in lname:
            feeds[vi.name] = np.ones(shape, dtype=dtype)
        elif "position" in lname:
            feeds[vi.name] = np.broadcast_to(past + np.arange(shape[-1] if shape else 1), shape).astype(dtype)
        elif "seqlens" in lname:
            feeds[vi.name] = np.full(shape, total - 1, dtype=dtype)
        elif "total" in lname:
            feeds[vi.name] = np.full(shape, total, dtype=dtype)
        else:
            feeds[vi.name] = rng.integers(0, _id_bound(owner, vi.name), size=shape).astype(dtype)
    return feeds


#: Model metadata key under which the structural passes record which cache positions they kept.
KEPT_KEY = "onnxprune.kv_cache_kept"


def kept_map(owner: Any) -> dict[str, tuple[int, list[int]]]:
    """Per cache input/output of a pruned graph: ``(axis, kept positions of the original axis)``."""
    proto = owner.proto if hasattr(owner, "proto") else owner
    for p in getattr(proto, "metadata_props", None) or []:
        if p.key == KEPT_KEY:
            try:
                data = json.loads(p.value)
                return {k: (int(v["axis"]), [int(i) for i in v["kept"]]) for k, v in data.items()}
            except (ValueError, KeyError, TypeError):
                return {}
    return {}


def record_kept(owner: Any, kept: Mapping[str, tuple[int, list[int]]]) -> dict[str, tuple[int, list[int]]]:
    """Store ``kept`` (positions of the *current* axes) in the model metadata, composed with what an
    earlier pass recorded, so the map always refers to the original model. Returns the new map."""
    proto = owner.proto if hasattr(owner, "proto") else owner
    old = kept_map(proto)
    new = dict(old)
    for name, (axis, pos) in kept.items():
        if name in old and old[name][0] == axis:
            new[name] = (axis, [old[name][1][i] for i in pos])
        else:
            new[name] = (axis, list(pos))
    text = json.dumps({k: {"axis": a, "kept": p} for k, (a, p) in sorted(new.items())}, separators=(",", ":"))
    for p in proto.metadata_props:
        if p.key == KEPT_KEY:
            p.value = text
            break
    else:
        proto.metadata_props.add(key=KEPT_KEY, value=text)
    return new


def fit_cache(arr: np.ndarray, axis: int, kept: list[int]) -> np.ndarray:
    """A dense graph's cache tensor cut to the kept positions of one axis."""
    return np.take(arr, np.asarray(kept, dtype=np.int64), axis=axis)


def fit_cache_feeds(feeds: Mapping[str, np.ndarray], declared: Mapping[str, list[Any] | None],
                    kept: Mapping[str, tuple[int, list[int]]] | None = None) -> dict[str, np.ndarray]:
    """``feeds`` of a dense graph with every cache input cut down for a pruned graph.

    A cache input listed in ``kept`` (:func:`kept_map` of the pruned graph) keeps those positions;
    another one whose array is longer than a static dim ``declared`` for the graph to run keeps its
    first entries on that axis (enough for shape checks).
    """
    kept = kept or {}
    out = dict(feeds)
    for name, arr in feeds.items():
        if not is_cache_name(name, "input"):
            continue
        if name in kept and kept[name][0] < np.ndim(arr):
            out[name] = fit_cache(np.asarray(arr), *kept[name])
            continue
        d = declared.get(name)
        if d is None or len(d) != np.ndim(arr):
            continue
        for axis, want in enumerate(d):
            if isinstance(want, int) and 0 < want < arr.shape[axis]:
                arr = np.take(arr, np.arange(want), axis=axis)
        out[name] = arr
    return out


__all__ = ["KEPT_KEY", "LLM_BATCH", "LLM_PAST", "LLM_SEQ", "declared_dims", "fit_cache", "fit_cache_feeds",
           "has_kv_cache", "is_cache_name", "kept_map", "kv_inputs", "kv_outputs", "llm_dims", "llm_feeds",
           "record_kept"]

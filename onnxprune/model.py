"""Model I/O: load, hold and save ONNX models without copying large weights.

A :class:`Model` wraps an ``onnx.ModelProto`` and keeps everything the graph does not (the path
it came from, the folder its external data lives in). Weights are reached through
:meth:`Model.get_array` and replaced through :meth:`Model.set_array`:

* initializers stored inside the file are decoded on demand;
* initializers in external data files are **memory-mapped** (``numpy.memmap``, read-only) and
  never read into RAM up front, so models over 2 GB load in a moment;
* files over ``STREAM_PARSE_BYTES`` (64 MB) are parsed field by field: large initializers keep
  their bytes in the ``.onnx`` file and are memory-mapped from it (``ExternalRef.inline``), so a
  435 MB BERT-base loads in ~0.1 s and ~50 MB of RAM;
* a replaced weight is written back into the proto (as ``raw_data``) at once, so the proto is
  always a complete model that the checker, shape inference and ONNX Runtime can read.

Saving writes a temporary file in the target folder, fsyncs it and renames it over the target, so
an interrupted save leaves either the old file or the new one. The serialized model is streamed
one initializer at a time (protobuf merges repeated embedded messages, so a model written as
"graph without initializers" followed by one ``{graph: {initializer: [t]}}`` fragment per weight
parses as the whole model): peak memory stays near one copy of the weights. Large models (or
models loaded with external data) are written with external data in ``OUT.onnx.data``; that file
goes through the same temp-file/fsync/rename path and is renamed into place just before the
``.onnx`` that points at it. (Two renames cannot be one atomic step: a hard kill in the
microseconds between them, while overwriting an existing output pair, can leave the new data file
beside the old ``.onnx``.)

Preconditions: the file is an ONNX ``ModelProto`` with a graph and an ``ai.onnx`` opset >= 7.
External data must lie inside the model's folder; paths that escape it are refused.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import uuid
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import ModelLoadError, ModelSaveError, UnsupportedModelError

log = logging.getLogger(__name__)

MIN_OPSET = 7
#: Above this many bytes of weights a model is saved with external data (protobuf limit is 2 GiB).
EXTERNAL_DATA_LIMIT = 1_800_000_000
#: Tensors smaller than this stay inside the .onnx file even when external data is used.
EXTERNAL_MIN_BYTES = 1024


@dataclass(frozen=True)
class ExternalRef:
    """Where an external initializer's bytes live.

    ``inline`` marks bytes that live inside the ``.onnx`` file itself (a large model's raw data,
    memory-mapped at load instead of parsed into the proto); such a model is still saved as one
    file by default.
    """

    path: Path
    offset: int
    length: int
    inline: bool = False


def _np_dtype(data_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))


def _nbytes(tensor: onnx.TensorProto) -> int:
    n = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    return n * _np_dtype(tensor.data_type).itemsize


@dataclass
class Model:
    """An ONNX model plus what the graph does not hold.

    Attributes:
        proto: The model. Initializers with external data keep their ``external_data`` entries
            (relative to ``base_dir``) until they are replaced or the model is saved.
        path: The file the model was loaded from, if any.
        base_dir: Folder that external data paths are relative to.
        external: Initializer name -> where its bytes are, for external initializers.
    """

    proto: onnx.ModelProto
    path: Path | None = None
    base_dir: Path | None = None
    external: dict[str, ExternalRef] = field(default_factory=dict)

    # ------------------------------------------------------------------ graph access
    @property
    def graph(self) -> onnx.GraphProto:
        """The main graph."""
        return self.proto.graph

    @property
    def opset(self) -> int:
        """The ``ai.onnx`` opset version."""
        return opset_version(self.proto)

    def initializer(self, name: str) -> onnx.TensorProto | None:
        """Return the main-graph initializer called ``name`` (or None)."""
        for t in self.graph.initializer:
            if t.name == name:
                return t
        return None

    def initializer_map(self) -> dict[str, onnx.TensorProto]:
        """Name -> initializer for the main graph."""
        return {t.name: t for t in self.graph.initializer}

    def graph_input_names(self) -> set[str]:
        """Names of graph inputs (including initializers that are also listed as inputs)."""
        return {i.name for i in self.graph.input}

    def is_constant(self, name: str) -> bool:
        """True if ``name`` is an initializer that is not also a graph input.

        An initializer listed among the graph inputs may be overridden at run time, so it is not
        treated as a constant — except in IR version < 4 models, where every initializer had to be
        listed as an input.
        """
        if self.initializer(name) is None:
            return False
        return self.proto.ir_version < 4 or name not in self.graph_input_names()

    def overridable_initializers(self) -> list[str]:
        """Initializers that are also graph inputs (IR >= 4), sorted."""
        if self.proto.ir_version < 4:
            return []
        return sorted(self.graph_input_names() & set(self.initializer_map()))

    # ------------------------------------------------------------------ weights
    def get_array(self, name: str) -> np.ndarray:
        """Return the value of initializer ``name``.

        External initializers come back as read-only memory maps; others as fresh arrays.

        Raises:
            KeyError: if there is no such initializer.
        """
        tensor = self.initializer(name)
        if tensor is None:
            raise KeyError(f"no initializer named {name!r}")
        ref = self.external.get(name)
        if ref is not None:
            dtype = _np_dtype(tensor.data_type)
            shape = tuple(int(d) for d in tensor.dims)
            if ref.length == 0:
                return np.zeros(shape, dtype=dtype)
            return np.memmap(ref.path, dtype=dtype, mode="r", offset=ref.offset, shape=shape)
        return numpy_helper.to_array(tensor)

    def set_array(self, name: str, value: np.ndarray) -> None:
        """Replace initializer ``name`` by ``value`` (its dtype and shape become the tensor's).

        Raises:
            KeyError: if there is no such initializer.
        """
        tensor = self.initializer(name)
        if tensor is None:
            raise KeyError(f"no initializer named {name!r}")
        arr = np.asarray(value, order="C")
        if (arr.dtype == _np_dtype(tensor.data_type) and arr.dtype.kind in "fiub" and arr.dtype.byteorder in "=|<"
                and tensor.data_type != onnx.TensorProto.STRING):
            # same element type: rewrite raw_data in place (one copy fewer than from_array + CopyFrom)
            for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "external_data"):
                tensor.ClearField(f)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.dims[:]
            tensor.dims.extend(arr.shape)
            tensor.raw_data = arr.tobytes()
            self.external.pop(name, None)
            return
        new = numpy_helper.from_array(arr, name)
        doc = tensor.doc_string
        tensor.CopyFrom(new)
        if doc:
            tensor.doc_string = doc
        self.external.pop(name, None)

    def add_initializer(self, name: str, value: np.ndarray) -> None:
        """Append a new initializer (the name must be unused)."""
        if self.initializer(name) is not None:
            raise ValueError(f"initializer {name!r} already exists")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, order="C"), name))

    def weight_bytes(self) -> int:
        """Total bytes of all main-graph initializers."""
        return sum(_nbytes(t) for t in self.graph.initializer)

    def copy(self) -> Model:
        """A deep copy whose proto can be changed without touching this one.

        External initializers stay memory-mapped references to the same files.
        """
        return Model(copy.deepcopy(self.proto), self.path, self.base_dir, dict(self.external))

    def materialized(self) -> onnx.ModelProto:
        """A copy of the proto with every external initializer read into ``raw_data``.

        Only for models that fit in memory (< 2 GB); used by checks and small tools.
        """
        proto = copy.deepcopy(self.proto)
        for t in proto.graph.initializer:
            if t.name in self.external:
                arr = np.ascontiguousarray(self.get_array(t.name))
                t.ClearField("external_data")
                t.data_location = onnx.TensorProto.DEFAULT
                t.raw_data = arr.tobytes()
        return proto

    @contextlib.contextmanager
    def as_file(self) -> Iterator[Path]:
        """Yield the path of a temporary copy of this model on disk (for ONNX Runtime).

        The copy (and its external data, if any) lives in a temporary folder removed on exit.
        """
        with tempfile.TemporaryDirectory(prefix="onnxprune-") as tmp:
            out = Path(tmp) / "model.onnx"
            save(self, out)
            yield out


# ---------------------------------------------------------------------- loading
def opset_version(proto: onnx.ModelProto) -> int:
    """The ``ai.onnx`` opset a model imports (0 if none)."""
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


#: Files above this size are parsed field by field (peak memory: the model plus its largest field,
#: instead of the model plus the whole file's bytes).
STREAM_PARSE_BYTES = 64 << 20
_MERGE_BATCH = 8 << 20


def _read_varint(f: object) -> tuple[int, bytes] | None:
    """Read one protobuf varint from a binary file: (value, raw bytes), or None at EOF."""
    raw = bytearray()
    value = shift = 0
    while True:
        b = f.read(1)  # type: ignore[attr-defined]
        if not b:
            if raw:
                raise ValueError("truncated varint")
            return None
        raw += b
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value, bytes(raw)
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _read_field(f: object) -> tuple[int, int, bytes, int] | None:
    """Read a field header: (field number, wire type, raw header bytes, payload length or -1)."""
    tag = _read_varint(f)
    if tag is None:
        return None
    number, wire = tag[0] >> 3, tag[0] & 7
    if wire == 2:
        length = _read_varint(f)
        if length is None:
            raise ValueError("truncated length")
        return number, wire, tag[1] + length[1], length[0]
    return number, wire, tag[1], -1


def _read_exact(f: object, n: int) -> bytes:
    data = f.read(n)  # type: ignore[attr-defined]
    if len(data) != n:
        raise ValueError("truncated field")
    return data


#: In a streamed parse, initializers at least this large keep their raw bytes in the file
#: (memory-mapped on access, like external data) instead of in the proto.
INLINE_REF_BYTES = 1 << 20


def _read_tensor_by_reference(f: object, length: int, path: Path) -> onnx.TensorProto:
    """Parse a TensorProto of ``length`` bytes at the file position, leaving ``raw_data`` in the file.

    The returned tensor points at its raw bytes with ``external_data`` (location: the model file
    itself, offset, length), so :func:`load` memory-maps them like any external initializer.
    """
    end = f.tell() + length  # type: ignore[attr-defined]
    meta = bytearray()
    raw: tuple[int, int] | None = None
    while f.tell() < end:  # type: ignore[attr-defined]
        number, wire, header, n = _read_field(f) or (0, 0, b"", 0)
        if number == 0:
            raise ValueError("truncated tensor")
        if number == 9 and wire == 2:  # raw_data
            raw = (f.tell(), n)  # type: ignore[attr-defined]
            f.seek(n, 1)  # type: ignore[attr-defined]
            continue
        meta += header
        if wire == 2:
            meta += _read_exact(f, n)
        elif wire == 0:
            v = _read_varint(f)
            if v is None:
                raise ValueError("truncated varint")
            meta += v[1]
        elif wire in (1, 5):
            meta += _read_exact(f, 8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if f.tell() != end:  # type: ignore[attr-defined]
        raise ValueError("tensor overruns its length")
    t = onnx.TensorProto()
    t.ParseFromString(bytes(meta))
    if raw is not None:
        offset, n = raw
        plain = t.data_location != onnx.TensorProto.EXTERNAL and not len(t.external_data)
        try:
            fits = plain and _nbytes(t) == n
        except (TypeError, ValueError, KeyError):  # dtypes numpy cannot size (string, 4-bit ...)
            fits = False
        if fits:
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", path.name), ("offset", str(offset)), ("length", str(n))):
                e = t.external_data.add()
                e.key, e.value = k, v
        else:
            f.seek(offset)  # type: ignore[attr-defined]
            t.raw_data = _read_exact(f, n)
            f.seek(end)  # type: ignore[attr-defined]
    return t


def _parse_streaming(path: Path) -> onnx.ModelProto:
    """Parse a ``ModelProto`` field by field, merging each graph field into the result.

    Protobuf merge semantics make this equal to one ``ParseFromString`` of the whole file
    (repeated fields append, singular fields overwrite), but the file's bytes are never held
    at once: peak memory is the parsed model plus one field (the largest initializer).
    """
    proto = onnx.ModelProto()
    with open(path, "rb", buffering=1 << 20) as f:
        while (field_ := _read_field(f)) is not None:
            number, wire, header, length = field_
            if number == 7 and wire == 2:  # graph: merge its fields in batches
                end = f.tell() + length
                batch = bytearray()
                while f.tell() < end:
                    sub = _read_field(f)
                    if sub is None or sub[3] < 0:
                        raise ValueError("malformed graph field")
                    if sub[0] == 5 and sub[3] >= INLINE_REF_BYTES:  # a large initializer
                        if batch:
                            proto.graph.MergeFromString(bytes(batch))
                            batch = bytearray()
                        proto.graph.initializer.append(_read_tensor_by_reference(f, sub[3], path))
                        continue
                    batch += sub[2]
                    batch += _read_exact(f, sub[3])
                    if len(batch) >= _MERGE_BATCH:
                        proto.graph.MergeFromString(bytes(batch))
                        batch = bytearray()
                if f.tell() != end:
                    raise ValueError("graph field overruns its length")
                if batch:
                    proto.graph.MergeFromString(bytes(batch))
                else:
                    proto.graph.SetInParent()
                continue
            if wire == 2:
                payload = _read_exact(f, length)
            elif wire == 0:
                value = _read_varint(f)
                if value is None:
                    raise ValueError("truncated varint")
                payload = value[1]
            elif wire in (1, 5):
                payload = _read_exact(f, 8 if wire == 1 else 4)
            else:
                raise ValueError(f"unsupported wire type {wire}")
            proto.MergeFromString(header + payload)
    return proto


def _read_proto(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path}: empty file")
    try:
        if size > STREAM_PARSE_BYTES:
            proto = _parse_streaming(path)
        else:
            proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, UnicodeDecodeError, ...
        raise ModelLoadError(
            f"{path}: not a valid ONNX model (the file is corrupt or truncated: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'parse failed'})"
        ) from None
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and len(proto.graph.output) == 0):
        raise ModelLoadError(f"{path}: not an ONNX model (it parses as protobuf but holds no graph)")
    if proto.ir_version <= 0:
        raise ModelLoadError(f"{path}: no ir_version; not an ONNX model or truncated")
    return proto


def _check_opset(proto: onnx.ModelProto, where: str) -> None:
    version = opset_version(proto)
    if version == 0:
        raise UnsupportedModelError(f"{where}: the model imports no ai.onnx opset")
    if version < MIN_OPSET:
        raise UnsupportedModelError(
            f"{where}: opset {version} is below the supported minimum {MIN_OPSET}; "
            "upgrade it with onnx.version_converter first"
        )
    latest = onnx.defs.onnx_opset_version()
    if version > latest:
        raise UnsupportedModelError(
            f"{where}: opset {version} is newer than this onnx package supports ({latest}); "
            "upgrade the onnx package"
        )


def _external_ref(tensor: onnx.TensorProto, base_dir: Path, where: str, kind: str = "initializer") -> ExternalRef:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location")
    if not location:
        raise ModelLoadError(f"{where}: {kind} {tensor.name!r} has external data without a location")
    base = base_dir.resolve()
    target = (base / location).resolve()
    if os.path.isabs(location) or not target.is_relative_to(base):
        raise ModelLoadError(
            f"{where}: {kind} {tensor.name!r} points at external data {location!r} outside the "
            "model's folder; refusing to read it"
        )
    if not target.is_file():
        raise ModelLoadError(
            f"{where}: external data file {location!r} for {kind} {tensor.name!r} is missing "
            f"(looked in {base})"
        )
    try:
        offset = int(info.get("offset", 0))
        expected = _nbytes(tensor)
        length = int(info.get("length", expected))
    except ValueError:
        raise ModelLoadError(f"{where}: {kind} {tensor.name!r} has a malformed offset/length") from None
    size = target.stat().st_size
    if offset < 0 or length < 0 or offset + length > size:
        raise ModelLoadError(
            f"{where}: {kind} {tensor.name!r} wants bytes {offset}..{offset + length} of "
            f"{location!r}, which has only {size} bytes"
        )
    if length != expected:
        raise ModelLoadError(
            f"{where}: {kind} {tensor.name!r} needs {expected} bytes for shape "
            f"{list(tensor.dims)} but its external data length in {location!r} is {length}"
        )
    return ExternalRef(target, offset, length)


def _nested_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor that is not a main-graph initializer: subgraph initializers and the tensors of
    node attributes (Constant values...), in the main graph, its subgraphs and model functions."""

    def from_nodes(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from from_graph(attr.g)
                for g in attr.graphs:
                    yield from from_graph(g)

    def from_graph(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        yield from from_nodes(g.node)

    yield from from_nodes(proto.graph.node)
    for f in proto.functions:
        yield from from_nodes(f.node)


def _inline_nested_external(proto: onnx.ModelProto, base_dir: Path, where: str) -> None:
    """Validate (inside the model's folder, in range) and read into ``raw_data`` every external
    tensor outside the main graph's initializers; they are small, and saving needs them inline."""
    for t in _nested_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        ref = _external_ref(t, base_dir, where, kind="tensor")
        with open(ref.path, "rb") as f:
            f.seek(ref.offset)
            data = f.read(ref.length)
        t.ClearField("external_data")
        t.data_location = onnx.TensorProto.DEFAULT
        t.raw_data = data


def _densify_sparse_initializers(proto: onnx.ModelProto, where: str = "model") -> None:
    """Turn ``graph.sparse_initializer`` entries into ordinary dense initializers.

    Raises:
        ModelLoadError: indices out of range, negative, of the wrong rank, or not matching the values.
    """
    graph = proto.graph
    if not len(graph.sparse_initializer):
        return
    for sp in graph.sparse_initializer:
        name = sp.values.name
        dims = tuple(int(d) for d in sp.dims)
        try:
            values = numpy_helper.to_array(sp.values).reshape(-1)
            idx = numpy_helper.to_array(sp.indices)
        except Exception as exc:  # malformed payloads
            raise ModelLoadError(f"{where}: sparse initializer {name!r} cannot be decoded ({exc})") from None
        size = int(np.prod(dims, dtype=np.int64))
        if any(d < 0 for d in dims) or idx.dtype.kind not in "iu":
            raise ModelLoadError(f"{where}: sparse initializer {name!r} has negative dims or non-integer indices")
        idx = idx.astype(np.int64)
        if idx.ndim == 2 and idx.shape[1] == len(dims):  # COO [NNZ, rank]
            if idx.size and ((idx < 0).any() or (idx >= np.array(dims, dtype=np.int64)).any()):
                raise ModelLoadError(f"{where}: sparse initializer {name!r} has indices outside its shape {list(dims)}")
            idx = np.ravel_multi_index(tuple(idx.T), dims) if idx.size else idx.reshape(-1)
        elif idx.ndim != 1:
            raise ModelLoadError(f"{where}: sparse initializer {name!r} has indices of shape {list(idx.shape)}; "
                                 f"expected [NNZ] or [NNZ, {len(dims)}]")
        if idx.shape[0] != values.shape[0]:
            raise ModelLoadError(f"{where}: sparse initializer {name!r} has {idx.shape[0]} indices for "
                                 f"{values.shape[0]} values")
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            raise ModelLoadError(f"{where}: sparse initializer {name!r} has indices outside its {size} elements")
        dense = np.zeros(size, dtype=values.dtype)
        dense[idx] = values
        graph.initializer.append(numpy_helper.from_array(dense.reshape(dims), name))
    graph.ClearField("sparse_initializer")


def load(path: str | os.PathLike[str], *, check: bool = True) -> Model:
    """Load an ONNX model without reading external weights into memory.

    Args:
        path: The ``.onnx`` file. External data files are looked up beside it.
        check: Run ``onnx.checker`` (catches cycles, undefined inputs, duplicate names).

    Returns:
        The model; external initializers are memory-mapped on access.

    Raises:
        ModelLoadError: missing/empty/corrupt file, bad external data.
        UnsupportedModelError: opset below 7 or newer than the installed onnx.
    """
    path = Path(path)
    proto = _read_proto(path)
    where = str(path)
    try:
        _decode_text(proto)
    except UnicodeDecodeError:
        raise ModelLoadError(f"{where}: not a valid ONNX model (a name or text field is not valid UTF-8; the file "
                             "is corrupt)") from None
    _check_opset(proto, where)
    base_dir = path.parent
    external: dict[str, ExternalRef] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            ref = _external_ref(tensor, base_dir, where)
            if _same_file(ref.path, path):
                ref = ExternalRef(ref.path, ref.offset, ref.length, inline=True)
            external[tensor.name] = ref
    _inline_nested_external(proto, base_dir, where)
    if len(proto.graph.sparse_initializer):
        _densify_sparse_initializers(proto, where)
    model = Model(proto=proto, path=path, base_dir=base_dir, external=external)
    if check:
        validate_graph(model, where)
    overridable = model.overridable_initializers()
    if overridable:
        log.warning(
            "%s: %d initializer(s) are also graph inputs and may be overridden at run time; they are "
            "treated as non-constant and left alone: %s",
            where, len(overridable), ", ".join(overridable[:5]) + (" ..." if len(overridable) > 5 else ""),
        )
    return model


def _decode_text(msg: object) -> None:
    """Check every string field of a parsed proto for valid UTF-8 (proto2 does not check it when
    parsing; the Python runtime then hands out ``bytes`` instead of ``str``, or raises, wherever the
    field is first read). Tensor payloads (``raw_data`` and friends) are not touched, so nothing
    large is copied.

    Raises:
        UnicodeDecodeError: a string field holds invalid UTF-8.
    """
    def check(value: object) -> None:
        if isinstance(value, bytes):
            value.decode("utf-8")  # raises for the invalid text
            raise UnicodeDecodeError("utf-8", value, 0, len(value), "string field returned as bytes")

    if isinstance(msg, onnx.TensorProto):
        for v in (msg.name, msg.doc_string, *(x for e in msg.external_data for x in (e.key, e.value))):
            check(v)
        return
    string = 9  # FieldDescriptor.TYPE_STRING
    for fd, value in msg.ListFields():  # type: ignore[attr-defined]
        if fd.message_type is not None:
            for v in (value if _is_repeated(fd) else [value]):
                _decode_text(v)
        elif fd.type == string:
            for v in (value if _is_repeated(fd) else [value]):
                check(v)


def validate_graph(model: Model, where: str = "model", _sorted: bool = False) -> None:
    """Run ``onnx.checker`` on the graph structure, turning failures into one-line errors.

    Raises:
        ModelLoadError: the graph is malformed (cycle, undefined input, duplicate names...).
    """
    if not len(model.graph.output):
        raise ModelLoadError(f"{where}: the graph has no outputs; nothing it computes could be kept")
    valid_types = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
    seen: set[str] = set()
    for t in model.graph.initializer:
        if t.name in seen:
            raise ModelLoadError(f"{where}: duplicate initializer name {t.name!r}")
        if t.data_type not in valid_types:
            raise ModelLoadError(f"{where}: initializer {t.name!r} has an undefined data type ({t.data_type})")
        seen.add(t.name)
    dup = _duplicate_node_name(model.graph)
    if dup:
        raise ModelLoadError(f"{where}: two nodes are named {dup!r}; node names must be unique (ONNX Runtime "
                             "refuses such models)")
    produced: set[str] = set()
    for node in model.graph.node:
        for out in node.output:
            if out and out in produced:
                raise ModelLoadError(
                    f"{where}: tensor {out!r} is produced twice (node {node.name or node.op_type!r}); "
                    "names must be unique"
                )
            if out:
                produced.add(out)
    proto = _shell(model.proto)
    try:
        onnx.checker.check_model(proto)
    except UnicodeDecodeError:
        raise ModelLoadError(f"{where}: not a valid ONNX model (text that is not valid UTF-8)") from None
    except onnx.checker.ValidationError as exc:
        msg = " ".join(str(exc).split())
        if not _sorted and ("topologically sorted" in msg or "not output of any previous nodes" in msg):
            available = {i.name for i in model.graph.input} | seen | {""}
            if not _toposortable(model.graph, available):
                raise ModelLoadError(f"{where}: {_unsortable_reason(model.graph, available)}") from None
            _toposort_inplace(model.graph, available)
            return validate_graph(model, where, _sorted=True)
        raise ModelLoadError(f"{where}: invalid ONNX model: {_first_line(msg)}") from None


def _duplicate_node_name(graph: onnx.GraphProto) -> str | None:
    """The first non-empty node name used twice in ``graph`` (each subgraph is its own scope)."""
    seen: set[str] = set()
    for node in graph.node:
        if node.name and node.name in seen:
            return node.name
        seen.add(node.name)
        for g in node_subgraphs(node):
            inner = _duplicate_node_name(g)
            if inner:
                return inner
    return None


def _first_line(msg: str, limit: int = 300) -> str:
    return msg[:limit] + ("..." if len(msg) > limit else "")


SMALL_TENSOR_BYTES = 1 << 16


def _shell_input(t: onnx.TensorProto, force: Collection[str] = ()) -> bool:
    """Whether :func:`_shell` presents initializer ``t`` as a graph input instead of carrying it."""
    return t.name in force or t.data_location == onnx.TensorProto.EXTERNAL or _nbytes(t) > SMALL_TENSOR_BYTES


def _shell(proto: onnx.ModelProto, force_inputs: Collection[str] = ()) -> onnx.ModelProto:
    """A cheap stand-in for checking: large or external initializers become graph inputs.

    The checker and shape inference only need the weights' types and shapes, plus the values of
    small constants (Reshape targets and the like), so large weights are not copied.
    ``force_inputs`` names initializers to present as inputs whatever their size.
    """
    inits = list(proto.graph.initializer)
    shell = copy_without_initializers(proto)
    declared = {i.name for i in shell.graph.input}
    for t in inits:
        if not _shell_input(t, force_inputs):
            shell.graph.initializer.append(t)
        elif t.name not in declared:
            shell.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return shell


def copy_without_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Copy a model, leaving out the main graph's initializers (no weight bytes are copied)."""
    out = onnx.ModelProto()
    _copy_fields(proto, out, skip="graph")
    _copy_fields(proto.graph, out.graph, skip="initializer")
    if not out.HasField("graph"):
        out.graph.SetInParent()
    return out


def _is_repeated(fd: object) -> bool:
    rep = getattr(fd, "is_repeated", None)
    if rep is not None:
        return bool(rep)
    return fd.label == fd.LABEL_REPEATED  # type: ignore[attr-defined]


def _copy_fields(src: object, dst: object, skip: str) -> None:
    for fd, value in src.ListFields():  # type: ignore[attr-defined]
        if fd.name == skip:
            continue
        if _is_repeated(fd):
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _toposortable(graph: onnx.GraphProto, available: set[str]) -> bool:
    return _topo_order(graph, available) is not None


def _topo_order(graph: onnx.GraphProto, available: set[str]) -> list[int] | None:
    order = _topo_order_partial(graph, available)
    return order if len(order) == len(graph.node) else None


def node_subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs a node holds in its attributes (If branches, Loop/Scan bodies)."""
    subs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            subs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            subs.extend(attr.graphs)
    return subs


def graph_outer_reads(sub: onnx.GraphProto) -> list[str]:
    """Names a (sub)graph reads from enclosing scopes, nested subgraphs included, in first-use order."""
    local = {x.name for x in sub.input} | {t.name for t in sub.initializer}
    for n in sub.node:
        local.update(n.output)
    names: list[str] = []
    for n in sub.node:
        names.extend(x for x in n.input if x and x not in local)
        names.extend(x for x in node_outer_reads(n) if x not in local)
    return list(dict.fromkeys(names))


def node_outer_reads(node: onnx.NodeProto) -> list[str]:
    """Names the subgraphs of ``node`` read from the scope ``node`` lives in (first-use order)."""
    names: list[str] = []
    for sub in node_subgraphs(node):
        names.extend(graph_outer_reads(sub))
    return list(dict.fromkeys(names))


def _outer_scope_names(graph: onnx.GraphProto) -> dict[int, list[str]]:
    """For nodes with subgraphs: names the subgraphs read from the enclosing scope."""
    result: dict[int, list[str]] = {}
    for i, node in enumerate(graph.node):
        names = node_outer_reads(node)
        if names:
            result[i] = names
    return result


def _unsortable_reason(graph: onnx.GraphProto, available: set[str]) -> str:
    """Why a graph cannot be sorted: an input nobody provides, or else a cycle (named)."""
    produced = set(available)
    for node in graph.node:
        produced.update(o for o in node.output if o)
    outer = _outer_scope_names(graph)
    for i, node in enumerate(graph.node):
        for x in [*node.input, *outer.get(i, ())]:
            if x and x not in produced:
                return (f"node {node.name or node.op_type!r} reads tensor {x!r}, which no node, graph input "
                        "or initializer provides")
    order = set(_topo_order_partial(graph, available))
    stuck = [graph.node[i].name or graph.node[i].op_type for i in range(len(graph.node)) if i not in order]
    return (f"the graph has a cycle through node(s) {', '.join(repr(n) for n in stuck[:5])}"
            + (" ..." if len(stuck) > 5 else ""))


def _topo_order_partial(graph: onnx.GraphProto, available: set[str]) -> list[int]:
    """Kahn's algorithm: indices of the nodes that can be ordered (all of them unless there is a cycle
    or an input nobody provides). Ties keep the original node order, so sorting is deterministic."""
    import heapq

    outer = _outer_scope_names(graph)
    waiting: dict[str, list[int]] = {}
    missing = [0] * len(graph.node)
    for i, node in enumerate(graph.node):
        needed = {x for x in [*node.input, *outer.get(i, ())] if x and x not in available}
        missing[i] = len(needed)
        for x in needed:
            waiting.setdefault(x, []).append(i)
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order: list[int] = []
    done: set[str] = set()
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for o in graph.node[i].output:
            if not o or o in done:
                continue
            done.add(o)
            for j in waiting.get(o, ()):
                missing[j] -= 1
                if missing[j] == 0:
                    heapq.heappush(ready, j)
    return order


def _toposort_inplace(graph: onnx.GraphProto, available: set[str]) -> None:
    order = _topo_order(graph, available)
    assert order is not None
    nodes = [copy.deepcopy(graph.node[i]) for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


# ---------------------------------------------------------------------- saving
def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def scratch_cwd() -> Iterator[Path]:
    """Run a block with the working directory in a throwaway folder (removed afterwards).

    Some third-party tools write debug files into the current directory (ONNX Runtime's symbolic
    shape inference dumps ``sym_shape_infer_temp.onnx`` and a ``<uuid>.data`` file when inference
    is incomplete); this keeps them out of the user's folder.
    """
    prev = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="onnxprune-cwd-") as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(prev)


@contextlib.contextmanager
def atomic_write(target: Path, mode: str = "wb") -> Iterator[object]:
    """Write ``target`` through a temporary file in the same folder, fsync, then rename.

    If the block raises (or the process dies), the target is untouched and the temporary file is
    removed (or, after a hard kill, left as a hidden ``.*.tmp`` file, never as the target).
    """
    target = Path(target)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    f = open(tmp, mode)  # noqa: SIM115
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _sparse_tensor(name: str, arr: np.ndarray) -> onnx.SparseTensorProto:
    flat = arr.reshape(-1)
    idx = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(flat[idx], name)
    indices = numpy_helper.from_array(idx, name + "_indices")
    sp = onnx.SparseTensorProto()
    sp.values.CopyFrom(values)
    sp.indices.CopyFrom(indices)
    sp.dims.extend(arr.shape)
    return sp


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | 0x80 if value else b)
        if not value:
            return bytes(out)


def _initializer_fragment_header(n: int) -> bytes:
    """Bytes that, followed by an ``n``-byte serialized TensorProto, form ``{graph: {initializer: [t]}}``."""
    inner = b"\x2a" + _varint(n)  # GraphProto.initializer = field 5, length-delimited
    return b"\x3a" + _varint(len(inner) + n) + inner  # ModelProto.graph = field 7, length-delimited


def save(
    model: Model,
    path: str | os.PathLike[str],
    *,
    inplace: bool = False,
    external_data: bool | None = None,
    sparse_initializers: bool = False,
    sparse_threshold: float = 0.5,
) -> Path:
    """Save ``model`` atomically.

    Args:
        model: The model.
        path: Target ``.onnx`` path.
        inplace: Allow writing over the file the model was loaded from.
        external_data: Write weights to ``<path>.data``. Default: when the model was loaded with
            external data or its weights exceed ~1.8 GB.
        sparse_initializers: Store float weights whose share of zeros is at least
            ``sparse_threshold`` as ``sparse_initializer`` (smaller file; ONNX Runtime densifies
            them at load; TensorRT's parser ignores them, so do not use this for TensorRT).
        sparse_threshold: Minimum share of zeros for sparse storage.

    Returns:
        The path written.

    Raises:
        ModelSaveError: the target is the input (without ``inplace``), or cannot be written.
    """
    path = Path(path)
    if not 0.0 <= sparse_threshold <= 1.0:
        raise ModelSaveError(f"sparse_threshold must be in [0, 1], got {sparse_threshold}")
    if model.path is not None and not inplace and (
        _same_file(path, model.path) or path.resolve() == model.path.resolve()
    ):
        raise ModelSaveError(f"{path}: refusing to write over the input model (use --inplace)")
    if not path.parent.exists():
        raise ModelSaveError(f"{path.parent}: output folder does not exist")
    if path.is_dir():
        raise ModelSaveError(f"{path}: is a directory")
    if external_data is None:
        external_data = (any(not r.inline for r in model.external.values())
                         or model.weight_bytes() > EXTERNAL_DATA_LIMIT)
    data_name = path.name + ".data"
    data_path = path.parent / data_name
    for ref in model.external.values():
        if _same_file(ref.path, data_path) and not inplace:
            raise ModelSaveError(f"{data_path}: refusing to write over the input's external data")
        if _same_file(ref.path, path) and not (inplace and model.path is not None and _same_file(path, model.path)):
            raise ModelSaveError(f"{path}: is the external data file of the input model; choose another output")

    shell = copy_without_initializers(model.proto)

    def fragments(data_file: object | None) -> Iterator[bytes]:
        offset = 0
        for t in model.proto.graph.initializer:
            frag = onnx.ModelProto()
            needs_value = t.name in model.external or data_file is not None or sparse_initializers
            arr = model.get_array(t.name) if needs_value else None
            if sparse_initializers and arr is not None and arr.dtype.kind == "f" and arr.size >= 16:
                nnz = int(np.count_nonzero(arr))
                zeros = arr.size - nnz
                # int64 indices (the ONNX spec's only index type) cost 8 B per non-zero: only
                # store sparse when that is actually smaller (fp32: > 2/3 zeros, fp16: > 4/5)
                smaller = nnz * (arr.itemsize + 8) < arr.size * arr.itemsize
                if zeros / arr.size >= sparse_threshold and smaller:
                    frag.graph.sparse_initializer.append(_sparse_tensor(t.name, np.asarray(arr)))
                    yield frag.SerializeToString()
                    continue
            if data_file is not None and arr is not None and arr.nbytes >= EXTERNAL_MIN_BYTES:
                buf = np.ascontiguousarray(arr).tobytes()
                pad = (-offset) % 64
                if pad:
                    data_file.write(b"\0" * pad)  # type: ignore[attr-defined]
                    offset += pad
                data_file.write(buf)  # type: ignore[attr-defined]
                d = frag.graph.initializer.add()
                d.name, d.data_type = t.name, t.data_type
                d.dims.extend(t.dims)
                if t.doc_string:
                    d.doc_string = t.doc_string
                d.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(buf)))):
                    e = d.external_data.add()
                    e.key, e.value = k, v
                offset += len(buf)
            elif t.name in model.external:
                # write the mapped bytes straight from the file mapping: no copy of the weight
                buf = np.ascontiguousarray(arr)
                meta = onnx.TensorProto()
                meta.CopyFrom(t)
                meta.ClearField("external_data")
                meta.ClearField("data_location")
                head = meta.SerializeToString() + b"\x4a" + _varint(buf.nbytes)  # raw_data: field 9
                yield _initializer_fragment_header(len(head) + buf.nbytes)
                yield head
                yield memoryview(buf.reshape(-1).view(np.uint8))
                continue
            else:  # serialize in place: no copy of the tensor into a fragment message
                payload = t.SerializeToString()
                yield _initializer_fragment_header(len(payload))
                yield payload
                continue
            yield frag.SerializeToString()

    try:
        if external_data:
            # the inner (data) file is renamed into place first, then the .onnx that points at it:
            # a run killed between the two renames leaves no .onnx that refers to missing data
            with atomic_write(path) as f, atomic_write(data_path) as data_file:
                f.write(shell.SerializeToString())  # type: ignore[attr-defined]
                for chunk in fragments(data_file):
                    f.write(chunk)  # type: ignore[attr-defined]
        else:
            with atomic_write(path) as f:
                f.write(shell.SerializeToString())  # type: ignore[attr-defined]
                for chunk in fragments(None):
                    f.write(chunk)  # type: ignore[attr-defined]
    except OSError as exc:
        raise ModelSaveError(f"{path}: cannot write: {exc}") from None
    return path


def from_proto(proto: onnx.ModelProto, base_dir: str | os.PathLike[str] | None = None) -> Model:
    """Wrap an in-memory ``ModelProto`` (external data, if any, relative to ``base_dir``)."""
    model = Model(proto=proto, path=None, base_dir=Path(base_dir) if base_dir else None)
    if base_dir is not None:
        for t in proto.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                model.external[t.name] = _external_ref(t, Path(base_dir), "model")
    return model

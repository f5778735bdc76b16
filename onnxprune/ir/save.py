"""Saving: atomic writes, streamed serialisation, external data and sparse storage.

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
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import ModelSaveError
from onnxprune.ir.graph import copy_without_initializers
from onnxprune.ir.model import Model

#: Above this many bytes of weights a model is saved with external data (protobuf limit is 2 GiB).
EXTERNAL_DATA_LIMIT = 1_800_000_000


#: Tensors smaller than this stay inside the .onnx file even when external data is used.
EXTERNAL_MIN_BYTES = 1024


# ---------------------------------------------------------------------- saving
def same_file(a: Path, b: Path) -> bool:
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
    sparse_stats: dict[str, list[str]] | None = None,
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
        sparse_stats: Filled, when given, with what ``sparse_initializers`` did: ``"sparse"``
            (initializers stored sparse) and ``"not_smaller"`` (sparse enough for the threshold,
            but int64 indices would have made them larger, e.g. 2:4 at 50% zeros; kept dense).

    Returns:
        The path written.

    Raises:
        ModelSaveError: the target is the input (without ``inplace``), or cannot be written.
    """
    path = Path(path)
    if not 0.0 <= sparse_threshold <= 1.0:
        raise ModelSaveError(f"sparse_threshold must be in [0, 1], got {sparse_threshold}")
    if model.path is not None and not inplace and (
        same_file(path, model.path) or path.resolve() == model.path.resolve()
    ):
        raise ModelSaveError(f"{path}: refusing to write over the input model (use --inplace)")
    if not path.parent.exists():
        raise ModelSaveError(f"{path.parent}: output folder does not exist")
    if path.is_dir():
        raise ModelSaveError(f"{path}: is a directory")
    if external_data is None:
        external_data = (any(not (r.inline or r.scratch) for r in model.external.values())
                         or model.weight_bytes() > EXTERNAL_DATA_LIMIT)
    data_name = path.name + ".data"
    data_path = path.parent / data_name
    for ref in model.external.values():
        if same_file(ref.path, data_path) and not inplace:
            raise ModelSaveError(f"{data_path}: refusing to write over the input's external data")
        if same_file(ref.path, path) and not (inplace and model.path is not None and same_file(path, model.path)):
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
                if sparse_stats is not None and zeros / arr.size >= sparse_threshold:
                    sparse_stats.setdefault("sparse" if smaller else "not_smaller", []).append(t.name)
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


@contextlib.contextmanager
def temporary_file(model: Model) -> Iterator[Path]:
    """Yield the path of a temporary copy of ``model`` on disk (for ONNX Runtime).

    The copy (and its external data, if any) lives in a temporary folder removed on exit.
    """
    with tempfile.TemporaryDirectory(prefix="onnxprune-") as tmp:
        out = Path(tmp) / "model.onnx"
        save(model, out)
        yield out

"""The in-memory model: hold an ONNX model and reach its weights without copying them.

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
  always a complete model that the checker, shape inference and ONNX Runtime can read --
  except in a model that holds memory-mapped weights (loaded with external data, or streamed):
  there a replaced weight of at least ``SPILL_BYTES`` is appended to a scratch file
  (:mod:`onnxprune.ir.scratch`) and memory-mapped from it like any external initializer, so the
  process never holds the pruned model; its proto entry is an external-data entry with the
  scratch file's absolute path. Saved bytes are the same either way.

Loading (streamed parsing, validation) is :mod:`onnxprune.ir.load`; atomic, streamed saving
with external data and sparse storage is :mod:`onnxprune.ir.save`.

Preconditions: the file is an ONNX ``ModelProto`` with a graph and an ``ai.onnx`` opset >= 7.
External data must lie inside the model's folder; paths that escape it are refused.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.ir.scratch import Scratch
from onnxprune.ir.tensors import ExternalRef, nbytes, np_dtype

log = logging.getLogger(__name__)


MIN_OPSET = 7

#: Replaced weights at least this large spill to the scratch file (in models with mapped weights).
SPILL_BYTES = 1 << 20


@dataclass
class Model:
    """An ONNX model plus what the graph does not hold.

    Attributes:
        proto: The model. Initializers with external data keep their ``external_data`` entries
            (relative to ``base_dir``) until they are replaced or the model is saved.
        path: The file the model was loaded from, if any.
        base_dir: Folder that external data paths are relative to.
        external: Initializer name -> where its bytes are, for external initializers.
        scratch: The scratch file replaced weights spill to (created on first need; shared with
            copies of this model; removed when the last of them is garbage collected).
        spill: Spill replaced weights of at least :data:`SPILL_BYTES`: None (default) when the
            model holds memory-mapped weights, True always, False never.
    """

    proto: onnx.ModelProto
    path: Path | None = None
    base_dir: Path | None = None
    external: dict[str, ExternalRef] = field(default_factory=dict)
    scratch: Scratch | None = field(default=None, repr=False, compare=False)
    spill: bool | None = field(default=None, repr=False, compare=False)

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
            dtype = np_dtype(tensor.data_type)
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
        if self._spills(arr):
            self._spill(tensor, arr)
            return
        if (arr.dtype == np_dtype(tensor.data_type) and arr.dtype.kind in "fiub" and arr.dtype.byteorder in "=|<"
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

    def _spills(self, arr: np.ndarray) -> bool:
        if arr.nbytes < SPILL_BYTES or arr.dtype.kind not in "fiub" or arr.dtype.byteorder not in "=|<":
            return False
        return bool(self.external) if self.spill is None else self.spill

    def _spill(self, tensor: onnx.TensorProto, arr: np.ndarray) -> None:
        """Append ``arr`` to the scratch file; ``tensor`` becomes an external entry pointing at it."""
        if self.scratch is None or self.scratch.closed:
            self.scratch = Scratch()
        ref = self.scratch.write(arr)
        for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data",
                  "raw_data", "external_data", "dims"):
            tensor.ClearField(f)
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        tensor.dims.extend(arr.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, val in (("location", str(ref.path)), ("offset", str(ref.offset)), ("length", str(ref.length))):
            e = tensor.external_data.add()
            e.key, e.value = key, val
        self.external[tensor.name] = ref

    def add_initializer(self, name: str, value: np.ndarray) -> None:
        """Append a new initializer (the name must be unused)."""
        if self.initializer(name) is not None:
            raise ValueError(f"initializer {name!r} already exists")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, order="C"), name))

    def weight_bytes(self) -> int:
        """Total bytes of all main-graph initializers."""
        return sum(nbytes(t) for t in self.graph.initializer)

    def copy(self) -> Model:
        """A deep copy whose proto can be changed without touching this one.

        External initializers stay memory-mapped references to the same files.
        """
        return Model(copy.deepcopy(self.proto), self.path, self.base_dir, dict(self.external), self.scratch, self.spill)

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


# ---------------------------------------------------------------------- loading
def opset_version(proto: onnx.ModelProto) -> int:
    """The ``ai.onnx`` opset a model imports (0 if none)."""
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0

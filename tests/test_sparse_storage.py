"""Sparse storage: ``save(..., sparse_initializers=True)`` writes masked weights as sparse_initializer.

ONNX Runtime must load the file and give outputs identical to the dense file, the file must
shrink, and ``onnxprune.load`` must read it back densified.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
from models import build_transformer_block, random_inputs
from onnxprune.cli import main
from onnxprune.ir.load import from_proto


def _ort(path) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = random_inputs(build_transformer_block(), batch=2, seq=8, seed=1)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.fixture(scope="module")
def masked():
    proto = build_transformer_block(hidden=64, ffn=256, layers=2)
    return onnxprune.optimize(from_proto(proto), "masks(sparsity=0.8)").model


@pytest.mark.parametrize("external", [False, True])
def test_sparse_storage_loads_in_ort_identically_and_shrinks(tmp_path, masked, external):
    dense = onnxprune.save(masked, tmp_path / "dense.onnx", external_data=external)
    sparse = onnxprune.save(masked, tmp_path / "sparse.onnx", sparse_initializers=True, external_data=external)

    def size(p):
        extra = p.with_name(p.name + ".data")
        return p.stat().st_size + (extra.stat().st_size if extra.exists() else 0)

    d, s = size(dense), size(sparse)
    print(f"\nsparse storage (80% masks, external={external}): dense {d:,} B, sparse {s:,} B ({s / d:.2%})")
    # 20% of the values (4 B) plus their int64 indices (8 B): 60% of the big weights' bytes
    assert s < 0.7 * d
    proto = onnx.load(str(sparse))
    sparse_names = {sp.values.name for sp in proto.graph.sparse_initializer}
    assert "layer0.ffn.up.weight" in sparse_names
    assert "layer0.ffn.up.bias" not in sparse_names  # dense (no zeros) stays an initializer
    onnx.checker.check_model(str(sparse))
    a, b = _ort(dense), _ort(sparse)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    back = onnxprune.load(sparse)
    for t in masked.graph.initializer:
        np.testing.assert_array_equal(back.get_array(t.name), masked.get_array(t.name))


def test_sparse_threshold_and_default_dense(tmp_path, masked):
    p = onnxprune.save(masked, tmp_path / "t.onnx", sparse_initializers=True, sparse_threshold=0.9)
    assert len(onnx.load(str(p)).graph.sparse_initializer) == 0  # 80% zeros < 90% threshold
    p = onnxprune.save(masked, tmp_path / "d.onnx")
    assert len(onnx.load(str(p)).graph.sparse_initializer) == 0


def test_cli_sparse_storage(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(build_transformer_block(hidden=64, ffn=256, layers=1), str(src))
    dense, sparse = tmp_path / "d.onnx", tmp_path / "s.onnx"
    assert main(["optimize", str(src), "-o", str(dense), "--passes", "masks(sparsity=0.75)", "-q"]) == 0
    assert main(["optimize", str(src), "-o", str(sparse), "--passes", "masks(sparsity=0.75)", "-q",
                 "--sparse-storage"]) == 0
    assert sparse.stat().st_size < 0.85 * dense.stat().st_size  # 25% x (4 B value + 8 B index) = 75%
    assert len(onnx.load(str(sparse)).graph.sparse_initializer) > 0
    a, b = _ort(dense), _ort(sparse)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_sparse_storage_never_grows_the_file(tmp_path):
    """At 2:4 (50% zeros) int64 indices would cost more than they save: those weights stay dense."""
    model = onnxprune.optimize(from_proto(build_transformer_block(hidden=64, ffn=256)), "nm(n=2,m=4)").model
    dense = onnxprune.save(model, tmp_path / "d.onnx")
    sparse = onnxprune.save(model, tmp_path / "s.onnx", sparse_initializers=True)
    assert len(onnx.load(str(sparse)).graph.sparse_initializer) == 0
    assert sparse.stat().st_size <= dense.stat().st_size

"""Layer-wise calibration with bounded memory (issue 17): blocks under ``max_memory``, shards, sessions, backends.

* ``max_memory`` small enough to cut the model into one block per depth stage gives the same
  bytes as one block (the walk is a :class:`SegmentRunner` over a dense snapshot, and calibration
  sessions run unoptimised, so a cut graph computes the same activations);
* ``calib_shards`` splits the batches; the Hessian is the shards' sum (equal to float tolerance);
* a model with external data gets its calibration sessions without any temporary copy;
* the PyTorch backend (CPU device standing in for CUDA) equals numpy to float tolerance.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from models import build_transformer_block, random_inputs
from onnxprune import optimize
from onnxprune.analysis import calibration as cal
from onnxprune.errors import CalibrationError
from onnxprune.ir.load import from_proto


def _setup(seed: int = 0):
    proto = build_transformer_block(seed=seed, layers=2)
    calib = [random_inputs(proto, batch=4, seq=12, seed=s) for s in range(6)]
    return proto, calib


def _weights(model) -> dict[str, bytes]:
    return {t.name: np.asarray(model.get_array(t.name)).tobytes() for t in model.graph.initializer}


@pytest.mark.parametrize("spec", ["nm(n=2,m=4,criterion=sparsegpt", "masks(sparsity=0.5,criterion=wanda"])
def test_blocks_under_a_small_budget_give_the_same_bytes(spec: str, monkeypatch) -> None:
    proto, calib = _setup()
    stages_seen = []
    real = cal.chunk_stages

    def spy(stages, kind, budget):
        out = real(stages, kind, budget)
        stages_seen.append(len(out))
        return out

    monkeypatch.setattr(cal, "chunk_stages", spy)
    one = optimize(from_proto(proto), spec + ")", calibration=calib).model
    blocks = optimize(from_proto(proto), spec + ",max_memory=1)", calibration=calib).model
    assert stages_seen[0] == 1 and stages_seen[1] > 2  # one block, then one block per depth stage
    assert _weights(one) == _weights(blocks)


def test_chunk_stages_respects_the_budget() -> None:
    t = [cal.CalibTarget(f"w{i}", [(f"x{i}", -1)], None, 64) for i in range(4)]
    per = cal.plan_bytes(64, "hessian")
    assert [len(c) for c in cal.chunk_stages([[x] for x in t], "hessian", 2 * per)] == [2, 2]
    assert [len(c) for c in cal.chunk_stages([[x] for x in t], "hessian", 1)] == [1, 1, 1, 1]
    # two weights on one activation count it once
    shared = [cal.CalibTarget("a", [("x", -1)], None, 64), cal.CalibTarget("b", [("x", -1)], None, 64)]
    assert cal.stage_bytes(shared, "hessian") == per


def test_shards_sum_to_the_whole_to_float_tolerance() -> None:
    proto, calib = _setup(seed=2)
    model = from_proto(proto)
    data = cal.as_calibration(calib, model)
    from onnxprune.analysis.weights import find_weights

    targets = cal.calib_targets(model, find_weights(model))
    full = {n: s["H"] for _, st in cal.calibration_stages(model, targets, data, kind="hessian") for n, s in st.items()}
    sharded = {n: s["H"] for _, st in cal.calibration_stages(model, targets, data, kind="hessian", shards=3)
               for n, s in st.items()}
    assert full.keys() == sharded.keys() and full
    for n in full:
        np.testing.assert_allclose(sharded[n], full[n], rtol=1e-12, atol=1e-9)


def test_memory_budget_parses_sizes() -> None:
    assert cal.memory_budget("6G") == 6 << 30
    assert cal.memory_budget("512MiB") == 512 << 20
    assert cal.memory_budget(1000) == 1000
    assert cal.memory_budget("auto") > 0
    with pytest.raises(CalibrationError, match="max_memory"):
        cal.memory_budget("lots")
    with pytest.raises(CalibrationError, match="positive"):
        cal.memory_budget("0")


def test_external_data_sessions_write_no_copy(tmp_path, monkeypatch) -> None:
    proto, calib = _setup(seed=3)
    path = tmp_path / "m.onnx"
    onnx.save_model(onnx.ModelProto.FromString(proto.SerializeToString()), path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
                    size_threshold=0)
    import onnxprune.check as check

    def no_copy(model):
        raise AssertionError("a temporary copy of the model was written")

    monkeypatch.setattr(check, "temporary_file", no_copy)
    ext = optimize(onnxprune.load(path), "nm(n=2,m=4,criterion=sparsegpt,mode=sequential)", calibration=calib).model
    monkeypatch.undo()
    mem = optimize(from_proto(proto), "nm(n=2,m=4,criterion=sparsegpt,mode=sequential)", calibration=calib).model
    assert _weights(ext) == _weights(mem)


def test_torch_backend_matches_numpy() -> None:
    pytest.importorskip("torch")
    proto, calib = _setup(seed=4)
    a = optimize(from_proto(proto), "nm(n=2,m=4,criterion=sparsegpt,backend=numpy)", calibration=calib).model
    b = optimize(from_proto(proto), "nm(n=2,m=4,criterion=sparsegpt,backend=torch:cpu)", calibration=calib).model
    for name, wa in _weights(a).items():
        x = np.frombuffer(wa, dtype=np.float32)
        y = np.frombuffer(_weights(b)[name], dtype=np.float32)
        np.testing.assert_array_equal(x == 0, y == 0)
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)

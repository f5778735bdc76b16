"""Tests of ``masks`` / ``nm`` with ``refit=true`` (least-squares re-fit of the kept weights, issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

from models import build_transformer_block, random_inputs
from onnxprune import optimize
from onnxprune.check import run_model
from onnxprune.errors import CalibrationError, PipelineError
from onnxprune.ir.load import from_proto


def _setup(seed: int = 0):
    proto = build_transformer_block(seed=seed, layers=2)
    calib = [random_inputs(proto, batch=4, seq=12, seed=s) for s in range(6)]
    return proto, calib


def _out_err(dense, pruned, feeds) -> float:
    """Mean squared output difference to the dense model over ``feeds`` (ONNX Runtime)."""
    errs = []
    for f in feeds:
        a = run_model(dense, f)
        b = run_model(pruned, f)
        errs.extend(float(np.mean((np.asarray(a[k]) - np.asarray(b[k])) ** 2)) for k in a)
    return float(np.mean(errs))


@pytest.mark.parametrize("spec", ["masks(sparsity=0.6,criterion=magnitude", "nm(n=2,m=4,criterion=wanda",
                                  "masks(sparsity=0.5,criterion=sparsegpt"])
def test_refit_keeps_the_mask_and_lowers_every_layer_error(spec: str) -> None:
    proto, calib = _setup()
    dense = from_proto(proto)
    base = optimize(from_proto(proto), spec + ")", calibration=calib)
    fit = optimize(from_proto(proto), spec + ",refit=true)", calibration=calib)
    st = fit.report.passes[0].stats
    assert st["refit"]["weights_refit"] == st["weights_targeted"] > 0
    for name, w in st["weights"].items():
        r = w["refit"]
        assert r["rel_err_after"] <= r["rel_err_before"], name
        assert r["solver"] in ("direct", "cg") and r["seconds"] >= 0
    # same number of zeros per weight as without refit, and zeros only where the mask says
    for name, w in st["weights"].items():
        assert w["nnz_after"] == base.report.passes[0].stats["weights"][name]["nnz_after"]
    assert st["refit"]["mean_rel_err_after"] < st["refit"]["mean_rel_err_before"]
    # the model is closer to the dense one on held-out inputs too
    held = [random_inputs(proto, batch=4, seq=12, seed=100 + s) for s in range(2)]
    assert _out_err(dense, fit.model, held) < _out_err(dense, base.model, held)


def test_refit_magnitude_mask_is_the_magnitude_mask() -> None:
    """Re-fitting changes values, never which entries are zero (magnitude masks come from dense weights)."""
    proto, calib = _setup(seed=1)
    base = optimize(from_proto(proto), "masks(sparsity=0.5)", calibration=calib).model
    fit = optimize(from_proto(proto), "masks(sparsity=0.5,refit=true,mode=parallel)", calibration=calib).model
    for t in base.graph.initializer:
        a, b = np.asarray(base.get_array(t.name)), np.asarray(fit.get_array(t.name))
        np.testing.assert_array_equal(a == 0, b == 0)
    changed = [t.name for t in base.graph.initializer
               if not np.array_equal(np.asarray(base.get_array(t.name)), np.asarray(fit.get_array(t.name)))]
    assert changed  # the kept values moved


def test_sequential_refit_beats_parallel_refit_on_the_output() -> None:
    proto, calib = _setup(seed=2)
    dense = from_proto(proto)
    seq = optimize(from_proto(proto), "masks(sparsity=0.7,refit=true)", calibration=calib)
    par = optimize(from_proto(proto), "masks(sparsity=0.7,refit=true,mode=parallel)", calibration=calib)
    assert _out_err(dense, seq.model, calib) < _out_err(dense, par.model, calib)


def test_refit_needs_calibration_and_layer_scope() -> None:
    proto, calib = _setup()
    with pytest.raises(CalibrationError, match="refit=true"):
        optimize(from_proto(proto), "masks(sparsity=0.5,refit=true)")
    with pytest.raises(PipelineError, match="refit"):
        optimize(from_proto(proto), "masks(sparsity=0.5,scope=global,refit=true)", calibration=calib)

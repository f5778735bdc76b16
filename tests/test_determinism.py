"""Determinism: the same input and options give a byte-identical output model.

For every registered pass (default options) on every builder model it runs on without
calibration: two in-process runs must save identical bytes, and two CLI runs in subprocesses with
different ``PYTHONHASHSEED`` values must too (that catches iteration over sets or dicts of strings
feeding the output). Passes that refuse a model with an :class:`OnnxPruneError` (e.g. because they
need calibration data) are skipped for it, with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import onnxprune
from models import build_cnn, build_mlp, build_transformer_block
from onnxprune.errors import OnnxPruneError

ROOT = Path(__file__).resolve().parent.parent
BUILDERS = {"mlp": build_mlp, "cnn": build_cnn, "transformer": build_transformer_block}
#: Passes whose product is not (only) the ONNX model, or that need hardware.
NOT_MODEL_PASSES = {"tensorrt", "trt", "engine"}


def _pass_names() -> list[str]:
    return [n for n in onnxprune.registered_passes() if n not in NOT_MODEL_PASSES]


def _optimize_bytes(src: Path, spec: str, out: Path) -> bytes:
    result = onnxprune.optimize(onnxprune.load(src), spec)
    onnxprune.save(result.model, out)
    return out.read_bytes()


@pytest.mark.parametrize("builder", sorted(BUILDERS))
@pytest.mark.parametrize("name", _pass_names())
def test_two_runs_identical_bytes(tmp_path: Path, name: str, builder: str) -> None:
    src = tmp_path / "in.onnx"
    onnx.save(BUILDERS[builder](seed=11), src)
    try:
        a = _optimize_bytes(src, name, tmp_path / "a.onnx")
    except OnnxPruneError as exc:
        pytest.skip(f"{name} refuses {builder} with default options: {exc}")
    b = _optimize_bytes(src, name, tmp_path / "b.onnx")
    assert a == b


_CHILD = """
import sys
from pathlib import Path
import onnxprune
from onnxprune.errors import OnnxPruneError
src, outdir = sys.argv[1], Path(sys.argv[2])
outdir.mkdir()
for name in sys.argv[3:]:
    try:
        result = onnxprune.optimize(onnxprune.load(src), name)
    except OnnxPruneError:
        continue
    onnxprune.save(result.model, outdir / (name + ".onnx"))
"""


def _run_all(src: Path, outdir: Path, names: list[str], hashseed: str) -> dict[str, bytes]:
    env = dict(os.environ, PYTHONHASHSEED=hashseed, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(outdir), *names], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {p.name: p.read_bytes() for p in sorted(outdir.iterdir())}


@pytest.mark.parametrize("builder", ["cnn", "transformer"])
def test_identical_across_hash_seeds(tmp_path: Path, builder: str) -> None:
    """Every default-option pass that accepts the model, in two processes with different hash seeds."""
    src = tmp_path / "in.onnx"
    onnx.save(BUILDERS[builder](seed=12), src)
    names = _pass_names()
    a = _run_all(src, tmp_path / "a", names, "1")
    b = _run_all(src, tmp_path / "b", names, "2")
    assert a.keys() == b.keys() and "cleanup.onnx" in a
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"output depends on PYTHONHASHSEED: {differ}"


def test_external_data_output_is_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "in.onnx"
    onnx.save(build_mlp(seed=3, in_features=64, hidden=(128,)), src, save_as_external_data=True,
              location="in.onnx.data", size_threshold=1024)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        result = onnxprune.optimize(onnxprune.load(src), "cleanup")
        onnxprune.save(result.model, tmp_path / d / "m.onnx")
    for name in ("m.onnx", "m.onnx.data"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_cleanup_is_a_noop_on_clean_models_and_idempotent(builder: str) -> None:
    """cleanup on a model with nothing to clean changes nothing (not even node order), and a second
    cleanup after a real one changes nothing either."""
    from onnx import helper

    from onnxprune.ir.load import from_proto

    proto = BUILDERS[builder](seed=5)
    result = onnxprune.optimize(from_proto(proto), "cleanup")
    assert not result.report.passes[0].modified
    assert result.model.proto.SerializeToString(deterministic=True) == proto.SerializeToString(deterministic=True)
    dirty = onnx.ModelProto.FromString(proto.SerializeToString())
    dirty.graph.node.append(helper.make_node("Relu", [dirty.graph.input[0].name], ["dead_end"], name="dead"))
    once = onnxprune.optimize(from_proto(dirty), "cleanup")
    assert once.report.passes[0].modified and "dead" not in [n.name for n in once.model.graph.node]
    twice = onnxprune.optimize(once.model, "cleanup")
    assert not twice.report.passes[0].modified
    assert twice.model.proto.SerializeToString(deterministic=True) == \
        once.model.proto.SerializeToString(deterministic=True)

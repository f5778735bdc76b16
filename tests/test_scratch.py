"""Bounded memory for weight passes: replaced weights spill to a mapped scratch file (``ir/scratch.py``).

On the ``tiny`` preset of ``scripts/make_llama.py`` (external data, ~0.3 MB) with the spill
threshold lowered so its weights spill: after ``nm`` the replaced weights are memory-mapped from the
scratch file (not bytes in the proto), the saved model is byte-identical to the in-proto path and
runs on ONNX Runtime, the scratch folder is gone after the model is dropped (also after an error),
and the input's external data is never written.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.analysis.heads.shapes import shape_slice, static_shapes
from onnxprune.api import optimize
from onnxprune.ir import model as model_mod
from onnxprune.ir import scratch as scratch_mod
from onnxprune.ir.load import load
from onnxprune.ir.save import save

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_make_llama", ROOT / "scripts" / "make_llama.py")
assert _spec and _spec.loader
make_llama = importlib.util.module_from_spec(_spec)
sys.modules["_make_llama"] = make_llama
_spec.loader.exec_module(make_llama)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir()
    return make_llama.make_llama(make_llama.PRESETS["tiny"], tmp_path / "in" / "m.onnx")


@pytest.fixture()
def scratch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "scratch"
    d.mkdir()
    monkeypatch.setenv(scratch_mod.ENV_DIR, str(d))
    return d


def _run(path: Path) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"input_ids": np.array([[1, 5, 9, 2]], dtype=np.int64)})[0]


def test_make_llama_reproducible_and_recognised(tiny: Path, tmp_path: Path) -> None:
    again = make_llama.make_llama(make_llama.PRESETS["tiny"], tmp_path / "again.onnx")
    assert _digest(Path(str(tiny) + ".data")) == _digest(Path(str(again) + ".data"))
    m = load(tiny)
    assert len(m.external) == 2 * 7 + 2  # 2 layers x 7 projections, embedding, lm_head
    res = optimize(m, "heads(ratio=0.25),ffn(ratio=0.25)")
    stats = {r.name: r.stats for r in res.report.passes}
    layers = make_llama.PRESETS["tiny"].layers
    assert stats["heads"]["blocks_found"] == layers and stats["heads"]["twin_check"] == "ok"
    assert stats["ffn"]["blocks_found"] == layers and stats["ffn"]["units_removed"] > 0


def test_nm_spills_maps_and_saves_identical_bytes(tiny: Path, tmp_path: Path, scratch_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data = Path(str(tiny) + ".data")
    before, mtime = _digest(data), data.stat().st_mtime_ns
    outs: dict[str, Path] = {}
    replaced: set[str] = set()
    for label, threshold in (("proto", 1 << 40), ("spill", 1024)):
        monkeypatch.setattr(model_mod, "SPILL_BYTES", threshold)
        res = optimize(load(tiny), "nm(n=2,m=4)")
        spilled = [n for n, r in res.model.external.items() if r.scratch]
        if label == "spill":
            assert set(spilled) == replaced and len(replaced) >= 2 * 7
            for name in spilled:
                t = res.model.initializer(name)
                assert not t.raw_data and t.data_location == onnx.TensorProto.EXTERNAL
                arr = res.model.get_array(name)
                assert isinstance(arr, np.memmap) and not arr.flags.writeable
                assert Path(arr.filename).parent.parent == scratch_dir
        else:
            assert not spilled and not list(scratch_dir.iterdir())
            replaced = set(load(tiny).external) - set(res.model.external)  # written into the proto
        out = tmp_path / label / "out.onnx"
        out.parent.mkdir()
        save(res.model, out)
        outs[label] = out
        folder = res.model.scratch.folder if res.model.scratch else None
        del res
        gc.collect()
        assert folder is None or not folder.exists()  # removed with the last model that used it
    for suffix in ("", ".data"):
        assert _digest(Path(str(outs["proto"]) + suffix)) == _digest(Path(str(outs["spill"]) + suffix))
    y = _run(outs["spill"])
    assert y.shape == (1, 4, make_llama.PRESETS["tiny"].vocab) and np.isfinite(y).all()
    assert _digest(data) == before and data.stat().st_mtime_ns == mtime  # the input's data never written
    assert not list(scratch_dir.iterdir())


def test_scratch_removed_after_an_error(tiny: Path, scratch_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_mod, "SPILL_BYTES", 1024)

    def fail() -> None:
        m = load(tiny)
        m.set_array("lm_head.weight", np.zeros((64, 96), np.float32))
        assert list(scratch_dir.iterdir())
        raise RuntimeError("a pass failed")

    with pytest.raises(RuntimeError):
        fail()
    gc.collect()
    assert not list(scratch_dir.iterdir())


def test_scratch_removed_at_exit_of_a_process(tiny: Path, scratch_dir: Path) -> None:
    code = ("import sys; from onnxprune.ir import model as mm; mm.SPILL_BYTES = 1024; "
            "from onnxprune.ir.load import load; import numpy as np; m = load(sys.argv[1]); "
            "m.set_array('lm_head.weight', np.ones((64, 96), np.float32)); print(m.scratch.folder)")
    out = subprocess.run([sys.executable, "-c", code, str(tiny)], capture_output=True, text=True, check=True,
                         env={**os.environ, scratch_mod.ENV_DIR: str(scratch_dir)})
    assert Path(out.stdout.strip()).parent == scratch_dir
    assert not list(scratch_dir.iterdir())


def test_stale_scratch_of_dead_process_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{scratch_mod.PREFIX}{dead.pid}-abc"
    stale_unhidden = tmp_path / f"{scratch_mod.PREFIX.lstrip('.')}{dead.pid}-abc"
    live = tmp_path / f"{scratch_mod.PREFIX}{os.getppid()}-abc"
    other = tmp_path / "unrelated"
    for d in (stale, stale_unhidden, live, other):
        d.mkdir()
        (d / "weights.data").write_bytes(b"x" * 10)
    s = scratch_mod.Scratch(tmp_path)
    assert not stale.exists() and not stale_unhidden.exists() and live.exists() and other.exists()
    assert s.folder.exists() and oct(s.folder.stat().st_mode & 0o777) == "0o700"
    ref = s.write(np.arange(10, dtype=np.float32))
    assert ref.offset % scratch_mod.ALIGN == 0
    ref2 = s.write(np.arange(3, dtype=np.float16))
    assert ref2.offset % scratch_mod.ALIGN == 0 and ref2.offset >= ref.length
    s.close()
    assert not s.folder.exists() and s.closed


def test_shape_capture_runs_no_weight(tiny: Path) -> None:
    m = load(tiny)
    shapes = static_shapes(m)
    assert shapes["cos"] == [1, 1, 7, 16] and shapes["causal_mask"] == [7, 7]
    open_names = ["cos", "sin", "causal_mask"]
    sliced = shape_slice(m.proto, open_names)
    assert not set(m.external) & {t.name for t in sliced.graph.initializer}  # no weight is read
    assert {o.name for o in sliced.graph.output} == set(open_names)


def test_cli_spills_beside_the_output(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxprune import cli

    monkeypatch.delenv(scratch_mod.ENV_DIR, raising=False)
    monkeypatch.setattr(model_mod, "SPILL_BYTES", 1024)
    made: list[Path] = []
    init = scratch_mod.Scratch.__init__

    def record(self: scratch_mod.Scratch, parent: object = None) -> None:
        init(self, parent)
        made.append(self.folder)

    monkeypatch.setattr(scratch_mod.Scratch, "__init__", record)
    outdir = tmp_path / "out"
    outdir.mkdir()
    assert cli.main(["optimize", str(tiny), "-o", str(outdir / "o.onnx"), "--passes", "nm(n=2,m=4)", "-q"]) == 0
    gc.collect()
    assert made and all(f.parent == outdir and f.name.startswith(".") for f in made)
    assert sorted(p.name for p in outdir.iterdir()) == ["o.onnx", "o.onnx.data"]  # scratch gone
    assert _run(outdir / "o.onnx").shape == (1, 4, make_llama.PRESETS["tiny"].vocab)

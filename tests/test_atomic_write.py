"""Never lose data: interrupted saves leave the old file (or the new one), never a partial one.

* In-process: ``open`` inside :mod:`onnxprune.ir.save` is replaced by a file whose ``write`` raises
  ``KeyboardInterrupt`` after some bytes; the target (and its external data) must be unchanged and
  no temporary file may remain.
* Hard kill: a child process saves a model through a deliberately slow writer and is killed with
  SIGKILL at several moments; afterwards the target is byte-identical to the old or the new model.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
import onnxprune.ir.save as save_mod
from onnxprune.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _model(seed: int, layers: int = 4, width: int = 64) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "X"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", width])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


class _Bomb:
    """A file wrapper whose writes raise KeyboardInterrupt once ``limit`` bytes were written."""

    def __init__(self, f: Any, limit: int) -> None:
        self._f, self._left = f, limit

    def write(self, data: bytes) -> int:
        if len(data) >= self._left:
            self._f.write(data[: self._left])
            self._f.flush()
            raise KeyboardInterrupt
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _arm(monkeypatch: pytest.MonkeyPatch, limit: int, only: str | None = None) -> None:
    def fake_open(path: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        f = open(path, mode, *a, **k)  # noqa: SIM115
        if only is None or only in str(path):
            return _Bomb(f, limit)
        return f

    monkeypatch.setattr(save_mod, "open", fake_open, raising=False)


def _hidden_tmp(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


@pytest.mark.parametrize("limit", [10, 5000, 40000])
def test_interrupted_save_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    out = tmp_path / "out.onnx"
    onnxprune.save(onnxprune.ir.load.from_proto(_model(0)), out)
    old = _sha(out)
    _arm(monkeypatch, limit)
    with pytest.raises(KeyboardInterrupt):
        onnxprune.save(onnxprune.ir.load.from_proto(_model(1)), out)
    assert _sha(out) == old
    assert _hidden_tmp(tmp_path) == []
    monkeypatch.undo()
    onnxprune.save(onnxprune.ir.load.from_proto(_model(1)), out)
    assert _sha(out) != old and len(onnxprune.load(out).graph.initializer) == 4


def test_interrupted_first_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _arm(monkeypatch, 3000)
    with pytest.raises(KeyboardInterrupt):
        onnxprune.save(onnxprune.ir.load.from_proto(_model(1)), tmp_path / "new.onnx")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("which", [".data", "out.onnx."])
def test_interrupted_external_data_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    out = tmp_path / "out.onnx"
    onnxprune.save(onnxprune.ir.load.from_proto(_model(0)), out, external_data=True)
    data = tmp_path / "out.onnx.data"
    assert data.is_file()
    old = (_sha(out), _sha(data))
    _arm(monkeypatch, 20000, only=which)
    with pytest.raises(KeyboardInterrupt):
        onnxprune.save(onnxprune.ir.load.from_proto(_model(1)), out, external_data=True)
    assert (_sha(out), _sha(data)) == old
    assert _hidden_tmp(tmp_path) == []
    monkeypatch.undo()
    reloaded = onnxprune.load(out)
    np.testing.assert_array_equal(reloaded.get_array("W0"), numpy_helper.to_array(_model(0).graph.initializer[0]))


def test_cli_interrupt_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    inp = tmp_path / "in.onnx"
    inp.write_bytes(_model(0).SerializeToString())
    before = _sha(inp)
    _arm(monkeypatch, 7000)
    code = main(["optimize", str(inp), "--passes", "cleanup", "-o", str(tmp_path / "o.onnx")])
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]
    assert _sha(inp) == before


def test_inplace_interrupt_keeps_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inp = tmp_path / "in.onnx"
    inp.write_bytes(_model(0).SerializeToString())
    before = _sha(inp)
    _arm(monkeypatch, 7000)
    assert main(["optimize", str(inp), "--passes", "cleanup", "--inplace", "-q"]) == 130
    assert _sha(inp) == before and sorted(os.listdir(tmp_path)) == ["in.onnx"]


_CHILD = textwrap.dedent("""
    import sys, time, builtins
    import onnx
    import onnxprune, onnxprune.ir.save as ms, onnxprune.ir.load as ml

    class Slow:
        def __init__(self, f): self._f = f
        def write(self, b):
            for i in range(0, len(b), 1 << 16):
                self._f.write(b[i:i + (1 << 16)]); self._f.flush(); time.sleep(0.002)
            return len(b)
        def __getattr__(self, n): return getattr(self._f, n)

    def slow_open(p, mode="r", *a, **k):
        return Slow(builtins.open(p, mode, *a, **k))

    ms.open = slow_open
    model = ml.from_proto(onnx.load(sys.argv[1]))
    print("start", flush=True)
    onnxprune.save(model, sys.argv[2], external_data=sys.argv[3] == "1")
    print("done", flush=True)
""")


@pytest.mark.parametrize("external", [False, True])
def test_sigkill_mid_save_leaves_old_or_new(tmp_path: Path, external: bool) -> None:
    """Kill a slow save at several moments; the target is always the whole old or the whole new model."""
    old_src, new_src = tmp_path / "old.onnx", tmp_path / "new.onnx"
    old_src.write_bytes(_model(0, layers=24, width=256).SerializeToString())  # ~6 MB each
    new_src.write_bytes(_model(1, layers=24, width=256).SerializeToString())
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "model.onnx"
    data = outdir / "model.onnx.data"
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def reference(src: Path, name: str) -> tuple[str, str | None]:
        ref_dir = tmp_path / name
        ref_dir.mkdir()
        onnxprune.save(onnxprune.ir.load.from_proto(onnx.load(src)), ref_dir / "model.onnx", external_data=external)
        d = ref_dir / "model.onnx.data"
        return _sha(ref_dir / "model.onnx"), (_sha(d) if d.exists() else None)

    old_ref, new_ref = reference(old_src, "ref_old"), reference(new_src, "ref_new")
    seen = set()
    for delay in (0.05, 0.15, 0.3, 0.6):
        onnxprune.save(onnxprune.ir.load.from_proto(onnx.load(old_src)), out, external_data=external)
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(new_src), str(out), "1" if external else "0"],
                                stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"start"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = (_sha(out), _sha(data) if data.exists() else None)
        assert state in (old_ref, new_ref), f"partial model after SIGKILL at {delay}s"
        seen.add("old" if state == old_ref else "new")
        loaded = onnxprune.load(out)  # loads and validates
        assert len(loaded.graph.initializer) == 24
        for n in _hidden_tmp(outdir):  # a hard kill may leave hidden temp files; never the target
            (outdir / n).unlink()
    assert "old" in seen  # the writer was really interrupted at least once


def test_interrupt_inside_a_pass_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from onnxprune.pipeline.manager import PassManager

    def interrupted(self: Any, model: Any, ctx: Any = None) -> Any:
        raise KeyboardInterrupt

    inp = tmp_path / "in.onnx"
    inp.write_bytes(_model(0).SerializeToString())
    monkeypatch.setattr(PassManager, "run", interrupted)
    assert main(["optimize", str(inp), "--passes", "cleanup", "-o", str(tmp_path / "o.onnx"),
                 "--report", str(tmp_path / "r.json")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]

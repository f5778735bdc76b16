"""The command line: outputs for scripts (--json, --quiet, --report), the check path, progress bars.

``optimize X --passes cleanup --check`` must leave the input byte-identical and match it to 1e-5
on the builder models, on model-zoo graphs from ``onnx/backend/test/data/light`` (whose weights
are ``ConstantOfShape`` stand-ins or bare graph inputs; they are replaced by random initializers)
and on torch exports (legacy and dynamo; slow).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models import build_cnn, build_mlp, build_transformer_block
from onnxprune import progress
from onnxprune.cli import main

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def zoo_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """A light model-zoo graph with random weights in place of its stand-ins (IR raised to 4)."""
    m = onnx.load(LIGHT / f"light_{name}.onnx")
    rng = np.random.default_rng(seed)
    g = m.graph
    shapes = {t.name: numpy_helper.to_array(t) for t in g.initializer}

    def weight(shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) == 1:  # biases and batch-norm vectors: positive, near one (safe for variances)
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return (rng.standard_normal(shape) * np.sqrt(2.0 / max(1, int(np.prod(shape[1:]))))).astype(np.float32)

    nodes, inits = [], []
    for n in g.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in shapes:
            inits.append(numpy_helper.from_array(weight(tuple(int(d) for d in shapes[n.input[0]])), n.output[0]))
        else:
            nodes.append(n)
    produced = {t.name for t in inits}
    inputs = []
    for i in g.input:
        if i.name in produced or i.name.endswith("__SHAPE"):
            continue
        tt = i.type.tensor_type
        shape = tuple(d.dim_value for d in tt.shape.dim)
        if tt.elem_type == onnx.TensorProto.FLOAT and len(shape) == 4 and "data" in i.name:
            inputs.append(i)
        elif tt.elem_type == onnx.TensorProto.INT64:  # the classifier's Reshape target
            inits.append(numpy_helper.from_array(np.array([1, -1], np.int64), i.name))
        else:
            inits.append(numpy_helper.from_array(weight(shape), i.name))
    del g.node[:]
    g.node.extend(nodes)
    del g.input[:]
    g.input.extend(inputs)
    del g.initializer[:]
    g.initializer.extend(inits)
    m.ir_version = max(m.ir_version, 4)
    return m


def _optimize_check(tmp_path: Path, proto: onnx.ModelProto, capsys: pytest.CaptureFixture[str],
                    extra: tuple[str, ...] = ()) -> dict:
    src = tmp_path / "in.onnx"
    onnx.save(proto, src)
    before = _sha(src)
    out = tmp_path / "out.onnx"
    capsys.readouterr()  # drop whatever building the model printed (torch exporters do)
    code = main(["optimize", str(src), "--passes", "cleanup", "--check", "--json", "-o", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert _sha(src) == before
    report = json.loads(captured.out)
    assert report["check"]["outputs"], report
    for o in report["check"]["outputs"]:
        assert o["shape_a"] == o["shape_b"]
        assert o["max_rel"] <= 1e-5, o
    return report


@pytest.mark.parametrize("build", [build_mlp, build_cnn, build_transformer_block], ids=["mlp", "cnn", "transformer"])
def test_cleanup_check_on_builders(tmp_path: Path, build: object, capsys: pytest.CaptureFixture[str]) -> None:
    proto = build(seed=3)  # type: ignore[operator]
    named = {d.dim_param for v in proto.graph.input for d in v.type.tensor_type.shape.dim if d.dim_param}
    dims = [a for name, size in (("batch", 2), ("seq", 8)) if name in named for a in ("--dim", f"{name}={size}")]
    _optimize_check(tmp_path, proto, capsys, tuple(dims))  # a --dim the model lacks is an error


@pytest.mark.parametrize("name", ["squeezenet", "densenet121"])
def test_cleanup_check_on_model_zoo(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    report = _optimize_check(tmp_path, zoo_model(name), capsys)
    assert report["before"]["parameters"] == report["after"]["parameters"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "inception_v2"])
def test_cleanup_check_on_model_zoo_large(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    _optimize_check(tmp_path, zoo_model(name), capsys)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_cleanup_check_on_torch_export(tmp_path: Path, dynamo: bool, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8 * 8 * 8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn(self.conv(x)))
            return self.fc(y.flatten(1))

    torch.manual_seed(0)
    net = Net().eval()
    path = tmp_path / "torch.onnx"
    try:
        torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(path), dynamo=dynamo, input_names=["x"],
                          output_names=["y"], opset_version=18)
    except Exception as exc:  # exporter not usable in this environment
        pytest.skip(f"torch.onnx.export(dynamo={dynamo}) failed: {type(exc).__name__}: {exc}")
    proto = onnx.load(path)
    (tmp_path / "w").mkdir()
    _optimize_check(tmp_path / "w", proto, capsys)


# ---------------------------------------------------------------------- output modes
@pytest.fixture()
def mlp_file(tmp_path: Path) -> Path:
    p = tmp_path / "mlp.onnx"
    onnx.save(build_mlp(seed=1), p)
    return p


def test_quiet_prints_nothing(mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["optimize", str(mlp_file), "--passes", "cleanup", "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert (mlp_file.parent / "mlp.pruned.onnx").is_file()  # default output name beside the input


def test_quiet_before_command_too(mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "optimize", str(mlp_file), "--passes", "cleanup", "-o", str(mlp_file.parent / "o.onnx")]) == 0
    assert capsys.readouterr().out == ""


def test_json_is_the_only_stdout(mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["optimize", str(mlp_file), "--passes", "cleanup", "--json", "-o", str(mlp_file.parent / "o.onnx")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["passes"][0]["name"] == "cleanup" and doc["output"]["path"].endswith("o.onnx")
    assert doc["before"]["parameters"] == doc["after"]["parameters"] > 0


def test_text_report(mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["optimize", str(mlp_file), "--passes", "cleanup", "-o", str(mlp_file.parent / "o.onnx")]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "cleanup" in out and "wrote" in out


def test_report_json_and_html(mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = mlp_file.parent
    assert main(["optimize", str(mlp_file), "--passes", "cleanup", "--check", "-q", "-o", str(d / "o.onnx"),
                 "--report", str(d / "r.json")]) == 0
    doc = json.loads((d / "r.json").read_text())
    assert doc["check"]["outputs"][0]["max_abs"] == 0.0
    assert main(["optimize", str(mlp_file), "--passes", "cleanup", "--check", "-q", "-o", str(d / "o2.onnx"),
                 "--report", str(d / "r.html")]) == 0
    page = (d / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<script" not in page
    assert "fc0.weight" in page and "classifier.weight" in page  # per-layer rows
    assert "cleanup" in page and "logits" in page  # pass table and check table
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]


def test_report_into_missing_folder_fails_before_writing(mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = mlp_file.parent
    code = main(["optimize", str(mlp_file), "--passes", "cleanup", "-o", str(d / "o.onnx"),
                 "--report", str(d / "nope" / "r.html")])
    assert code == 2 and "--report" in capsys.readouterr().err
    assert not (d / "o.onnx").exists()


def test_report_never_overwrites_a_model(mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _sha(mlp_file)
    d = mlp_file.parent
    for target in (mlp_file, d / "o.onnx"):
        code = main(["optimize", str(mlp_file), "--passes", "cleanup", "-o", str(d / "o.onnx"), "--report", str(target)])
        assert code == 2 and "--report" in capsys.readouterr().err
    assert _sha(mlp_file) == before and not (d / "o.onnx").exists()


def test_html_report_shows_masks(mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With a sparsifying pass the per-layer density drops (when the nm pass is registered)."""
    from onnxprune.pipeline.registry import registered_passes

    if "nm" not in registered_passes():
        pytest.skip("nm pass not registered in this build")
    import onnxprune
    from onnxprune.report_html import layer_rows

    res = onnxprune.optimize(onnxprune.load(mlp_file), "nm(n=2,m=4)", per_layer=True)
    rows = {r["name"]: r for r in layer_rows(res.report)}
    assert rows["fc0.weight"]["density_before"] == 1.0
    assert rows["fc0.weight"]["density_after"] == pytest.approx(0.5)


def test_check_tolerance_exceeded_writes_no_model(mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from onnxprune.pipeline.registry import registered_passes

    if "nm" not in registered_passes():
        pytest.skip("nm pass not registered in this build")
    d = mlp_file.parent
    code = main(["optimize", str(mlp_file), "--passes", "nm(n=2,m=4)", "--check", "--atol", "1e-9", "-q",
                 "-o", str(d / "o.onnx"), "--report", str(d / "r.json")])
    assert code == 1
    assert "not written" in capsys.readouterr().err
    assert not (d / "o.onnx").exists()
    assert json.loads((d / "r.json").read_text())["check"]["outputs"][0]["max_abs"] > 1e-9


def test_inplace(mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from models import random_inputs
    from onnxprune.check import run_model

    feeds = random_inputs(onnx.load(mlp_file))
    ref = run_model(str(mlp_file), feeds)["logits"]
    assert main(["optimize", str(mlp_file), "--passes", "cleanup", "--inplace", "-q"]) == 0
    assert sorted(os.listdir(mlp_file.parent)) == ["mlp.onnx"]  # no temp files, no second output
    onnx.checker.check_model(onnx.load(mlp_file), full_check=True)
    np.testing.assert_allclose(run_model(str(mlp_file), feeds)["logits"], ref, rtol=1e-6)


def test_passes_and_recipe_are_exclusive(mlp_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = tmp_path / "r.toml"
    r.write_text('[[pass]]\nname = "cleanup"\n')
    assert main(["optimize", str(mlp_file), "--passes", "cleanup", "--recipe", str(r)]) == 2
    assert "either" in capsys.readouterr().err
    # no pipeline at all: the budgeted search runs (tests/test_auto.py) and writes IN.pruned.onnx
    assert main(["optimize", str(mlp_file), "-q", "--time-limit", "30", "-o", str(tmp_path / "auto.onnx")]) == 0
    assert (tmp_path / "auto.onnx").is_file()
    assert main(["optimize", str(mlp_file), "--recipe", str(r), "-q", "-o", str(tmp_path / "o.onnx")]) == 0


def test_recipe_per_layer_overrides_end_to_end(mlp_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A recipe's [pass.layers] table reaches the pass: per-layer sparsity and skip."""
    import onnxprune

    if "masks" not in onnxprune.registered_passes():
        pytest.skip("masks not registered in this build")
    r = tmp_path / "r.toml"
    r.write_text('[[pass]]\nname = "masks"\nsparsity = 0.5\n[pass.layers]\n'
                 '"fc0" = { sparsity = 0.25 }\n"classifier" = { skip = true }\n')
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(mlp_file), "--recipe", str(r), "-o", str(out), "-q"]) == 0
    m = onnxprune.load(out)

    def sparsity(name: str) -> float:
        w = np.asarray(m.get_array(name))
        return 1 - np.count_nonzero(w) / w.size

    assert sparsity("fc0.weight") == pytest.approx(0.25, abs=0.01)
    assert sparsity("fc1.weight") == pytest.approx(0.5, abs=0.01)
    assert sparsity("classifier.weight") == 0.0


def test_passes_listing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes"]) == 0
    assert "cleanup:" in capsys.readouterr().out
    assert main(["passes", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "max_fold_mb" in [o["name"] for o in doc["cleanup"]["options"]]


def test_inspect_json(mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(mlp_file), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["opset"] == 17 and doc["summary"]["parameters"] > 0


def test_check_command(mlp_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.onnx"
    onnx.save(build_mlp(seed=2), other)
    assert main(["check", str(mlp_file), str(mlp_file), "--json", "--atol", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"][0]["max_abs"] == 0.0
    assert main(["check", str(mlp_file), str(other), "--atol", "1e-6"]) == 1
    assert "differ" in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "optimize" in capsys.readouterr().out


# ---------------------------------------------------------------------- progress
class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_silent_without_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    items = [1, 2, 3]
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress.progress(items, desc="x") is items


def test_progress_bar_on_tty_and_quiet_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _TTY()
    monkeypatch.setattr("sys.stderr", fake)
    progress.set_enabled(True)
    assert list(progress.progress(range(5), desc="calibration", unit="batch")) == [0, 1, 2, 3, 4]
    assert "calibration" in fake.getvalue()
    with progress.disabled():
        items = [1]
        assert progress.progress(items) is items
    assert progress.active()
    progress.set_enabled(False)
    try:
        assert not progress.active()
    finally:
        progress.set_enabled(True)


def test_cli_quiet_turns_progress_off(mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        main(["optimize", str(mlp_file), "--passes", "cleanup", "-q", "-o", str(mlp_file.parent / "o.onnx")])
        assert progress.ENABLED is False
        main(["optimize", str(mlp_file), "--passes", "cleanup", "-o", str(mlp_file.parent / "o2.onnx")])
        assert progress.ENABLED is True
    finally:
        progress.set_enabled(True)


def test_internal_error_is_one_line_exit_3(mlp_file: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import onnxprune

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("simulated bug\nsecond line")

    monkeypatch.setattr(onnxprune, "optimize", boom)
    code = main(["optimize", str(mlp_file), "--passes", "cleanup", "-o", str(mlp_file.parent / "o.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "internal error" in err[0] and "simulated bug" in err[0]
    assert not (mlp_file.parent / "o.onnx").exists()


def test_html_report_escapes_names_and_handles_missing_rows(tmp_path: Path) -> None:
    """Tensor names come from the model file: they are escaped, never interpreted as markup."""
    import onnxprune
    from onnxprune.report_html import render_html

    proto = build_mlp(seed=4)
    evil = "<script>alert(1)</script>"
    for t in proto.graph.initializer:
        if t.name == "fc0.weight":
            t.name = evil
    for n in proto.graph.node:
        n.input[:] = [evil if x == "fc0.weight" else x for x in n.input]
    res = onnxprune.optimize(onnxprune.ir.load.from_proto(proto), "cleanup", per_layer=True)
    res.report.warnings.append('warn <img src=x onerror="1">')
    page = render_html(res.report)
    assert "<script" not in page and "<img" not in page and "&lt;script&gt;" in page
    res.report.before.per_initializer = []
    res.report.after.per_initializer = []
    assert "No per-layer data" in render_html(res.report)


def test_html_report_caps_chart_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxprune
    import onnxprune.report_html as rh

    monkeypatch.setattr(rh, "MAX_CHART_ROWS", 2)
    res = onnxprune.optimize(onnxprune.ir.load.from_proto(build_mlp(seed=4)), "cleanup", per_layer=True)
    page = rh.render_html(res.report)
    assert "the chart shows the 0 that changed" in page
    assert page.count("<g><title>") == 0 and "fc0.weight" in page  # table keeps every row

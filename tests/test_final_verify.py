"""Final verification in the pass manager (ONNX Runtime load and run checks) and loud --check failures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.errors import PassError
from onnxprune.ir.load import from_proto
from onnxprune.ir.model import Model
from onnxprune.pipeline import registry
from onnxprune.pipeline.base import Pass, PassContext, PassResult
from onnxprune.pipeline.manager import PassManager
from onnxprune.pipeline.registry import register_pass


class NanPass(Pass):
    """Puts a NaN into the weight."""

    name = "fv-nan"
    description = "write a NaN into W (test pass)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        w = np.array(model.get_array("W"))
        w[0, 0] = np.nan
        model.set_array("W", w)
        return PassResult(model, True, {})


class NarrowPass(Pass):
    """Drops two output columns: the output shape changes."""

    name = "fv-narrow"
    description = "drop columns of W (test pass)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        model.set_array("W", np.array(model.get_array("W"))[:, :2])
        return PassResult(model, True, {})


class UnloadablePass(Pass):
    """Valid for the checker and shape inference, but ONNX Runtime has no kernel for it."""

    name = "fv-unloadable"
    description = "insert an op ONNX Runtime cannot load (test pass)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        g = model.graph
        g.node[0].output[0] = "Y0"
        g.node.append(helper.make_node("Frobnicate", ["Y0"], ["Y"], name="frob", domain="com.example"))
        model.proto.opset_import.append(helper.make_opsetid("com.example", 1))
        return PassResult(model, True, {})


class ScalePass(Pass):
    """A harmless change."""

    name = "fv-scale"
    description = "scale W by two (test pass)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        model.set_array("W", np.array(model.get_array("W")) * 2)
        return PassResult(model, True, {})


CLASSES = (NanPass, NarrowPass, UnloadablePass, ScalePass)


@pytest.fixture(autouse=True)
def toy_passes() -> Iterator[None]:
    registry.registered_passes()
    for cls in CLASSES:
        register_pass(cls)
    yield
    for cls in CLASSES:
        registry._REGISTRY.pop(cls.name, None)


def _proto(dynamic: bool = False) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "W")
    x_shape = ["batch", 3] if not dynamic else ["batch", "k"]
    m = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "n"])], [w]),
        opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _run(*passes: Pass, proto: onnx.ModelProto | None = None, **kw: object) -> Model:
    model, _ = PassManager(list(passes), **kw).run(from_proto(proto or _proto()))  # type: ignore[arg-type]
    return model


def test_unloadable_result_fails_naming_the_pass() -> None:
    with pytest.raises(PassError, match="pass fv-unloadable: produced a model that ONNX Runtime cannot load"):
        _run(ScalePass(), UnloadablePass(), ScalePass())


def test_changed_output_shape_fails() -> None:
    with pytest.raises(PassError, match=r"final verification failed after pass fv-narrow: output 'Y' changed shape"):
        _run(NarrowPass())


def test_new_nan_fails_and_names_every_modifying_pass() -> None:
    with pytest.raises(PassError, match=r"after passes fv-scale, fv-nan: output 'Y' has NaN/Inf"):
        _run(ScalePass(), NanPass())


def test_no_verify_skips_the_checks() -> None:
    model = _run(NanPass(), verify=False)
    assert np.isnan(model.get_array("W")).any()


def test_harmless_pass_verifies() -> None:
    _run(ScalePass())


def test_input_that_runs_on_no_synthesized_inputs_skips_the_run_check() -> None:
    # X [batch, k] @ W [3, 4] runs only for k = 3, which no candidate length gives: the run check is
    # skipped with a warning, the load check still applies
    ctx = PassContext()
    model, _ = PassManager([NanPass()]).run(from_proto(_proto(dynamic=True)), ctx)
    assert any("final run check skipped" in w and "--dim" in w for w in ctx.warnings)
    with pytest.raises(PassError, match="fv-unloadable"):
        PassManager([UnloadablePass()]).run(from_proto(_proto(dynamic=True)))


def test_given_check_inputs_are_used() -> None:
    feeds = {"X": np.ones((2, 3), np.float32)}
    with pytest.raises(PassError, match="changed shape: \\[2, 4\\] -> \\[2, 2\\]"):
        _run(NarrowPass(), check_inputs=feeds)


def _write(tmp_path: Path, proto: onnx.ModelProto, name: str = "m.onnx") -> Path:
    p = tmp_path / name
    onnx.save(proto, p)
    return p


def test_cli_verification_failure_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = _write(tmp_path, _proto()), tmp_path / "o.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--passes", "fv-nan", "-q"]) == 2
    assert "fv-nan" in capsys.readouterr().err and not out.exists()
    assert main(["optimize", str(src), "-o", str(out), "--passes", "fv-unloadable", "-q"]) == 2
    assert "cannot load" in capsys.readouterr().err and not out.exists()


def test_cli_check_fails_loudly_whatever_the_tolerances(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = _write(tmp_path, _proto()), tmp_path / "o.onnx"
    code = main(["optimize", str(src), "-o", str(out), "--passes", "fv-nan", "--no-verify", "--check", "-q",
                 "--rtol", "1e9"])
    err = capsys.readouterr().err
    assert code == 1 and "NaN/Inf" in err and "was not written" in err and not out.exists()
    bad = _proto()
    w = numpy_helper.to_array(bad.graph.initializer[0]).copy()
    w[0, 0] = np.inf
    bad.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    assert main(["check", str(src), str(_write(tmp_path, bad, "b.onnx")), "-q"]) == 1
    assert "NaN/Inf" in capsys.readouterr().err
    narrow = _proto()
    narrow.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((3, 2), np.float32), "W"))
    assert main(["check", str(src), str(_write(tmp_path, narrow, "n.onnx")), "-q"]) == 1
    assert "changed shape" in capsys.readouterr().err
    assert main(["check", str(src), str(src), "-q"]) == 0


def test_no_verify_also_skips_the_in_pass_twin_check() -> None:
    """``verify=False`` (``--no-verify``) reaches the structured passes' masked-twin check."""
    import onnxprune
    from models import build_cnn

    model = from_proto(build_cnn())
    on = onnxprune.optimize(model, "channels(ratio=0.3)").report.passes[0].stats
    off = onnxprune.optimize(model, "channels(ratio=0.3)", verify=False).report.passes[0].stats
    assert on.get("twin_check") == "ok"
    assert "twin_check" not in off

"""Pipeline planning (issue 15, point 4): N:M after structural removal, unused calibration data,
per-layer overrides that match nothing, match node names, ``skip = true``, and which passes take them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from models import build_transformer_block, random_inputs
from models.exported import exporter_names
from onnxprune.cli import main
from onnxprune.errors import OnnxPruneError, PipelineError
from onnxprune.ir.load import from_proto
from onnxprune.pipeline.plan import plan_pipeline
from onnxprune.pipeline.spec import load_recipe, parse_pipeline
from onnxprune.tensorrt.eligibility import inspect_nm


def _model(layers: int = 2) -> onnxprune.Model:
    return from_proto(exporter_names(build_transformer_block(layers=layers)))


def _calib() -> list[dict[str, np.ndarray]]:
    proto = build_transformer_block(layers=2)
    return [random_inputs(proto, batch=2, seq=8, seed=s) for s in range(2)]


@pytest.mark.parametrize(("given", "expected"), [(1, 4), (4, 4), (8, 8), (6, 12)])
def test_structural_pass_before_nm_rounds_to_m(given: int, expected: int) -> None:
    user = parse_pipeline(f"channels(ratio=0.3,round_to={given}),nm(n=2,m=4)")
    planned, notes = plan_pipeline(user)
    assert planned[0].options.round_to == expected
    assert user[0].options.round_to == given  # the caller's pass is not changed
    assert bool(notes) == (given != expected)
    assert plan_pipeline(parse_pipeline("channels(ratio=0.3)"))[0][0].options.round_to == 1  # no nm: as asked


def test_ffn_then_nm_masks_every_weight() -> None:
    # 128 neurons at ratio 0.3 keep 90 (not a multiple of 4): the down projection's K would be 90
    plain = onnxprune.optimize(_model(), "ffn(ratio=0.3)").model
    assert sorted({w["k"] for w in inspect_nm(plain, 2, 4)["weights"]} - {64}) == [90]
    res = onnxprune.optimize(_model(), "ffn(ratio=0.3),nm(n=2,m=4)")
    nm = res.report.passes[1].stats
    assert nm["weights_skipped"] == 0 and nm["weights_pruned"] == nm["weights_targeted"] == 12
    summary = inspect_nm(res.model, 2, 4)["summary"]
    assert summary["ok"] == 12 and summary["violates"] == summary["skipped"] == 0
    assert any("round_to=1 -> 4" in w for w in res.report.warnings)


def test_unused_calibration_is_named() -> None:
    res = onnxprune.optimize(_model(), "masks(sparsity=0.5)", calibration=_calib())
    assert any("calibration data was given but no pass read it" in w and "masks criterion=magnitude" in w
               for w in res.report.warnings)
    used = onnxprune.optimize(_model(), "masks(sparsity=0.5,criterion=wanda)", calibration=_calib())
    assert not any("no pass read it" in w for w in used.report.warnings)
    none = onnxprune.optimize(_model(), "masks(sparsity=0.5)")
    assert not any("no pass read it" in w for w in none.report.warnings)


def _recipe(tmp_path: Path, body: str) -> str:
    p = tmp_path / "r.toml"
    p.write_text(body)
    return str(p)


def test_override_matching_nothing_is_an_error_naming_it(tmp_path: Path) -> None:
    passes, ov = load_recipe(_recipe(tmp_path, '[[pass]]\nname = "masks"\n[pass.layers]\n'
                                               '"layer0\\\\..*" = { sparsity = 0.3 }\n'))
    with pytest.raises(OnnxPruneError, match=r"override 'layer0\\\\\.\.\*' matches no weight"):
        onnxprune.optimize(_model(), passes, recipe_overrides=ov)


def test_overrides_match_node_names_and_skip(tmp_path: Path) -> None:
    passes, ov = load_recipe(_recipe(tmp_path, '[[pass]]\nname = "masks"\nsparsity = 0.5\n[pass.layers]\n'
                                               '"/encoder/layer\\\\.0/" = { sparsity = 0.25 }\n'
                                               '"[0-9]/output/dense" = { skip = true }\n'))
    res = onnxprune.optimize(_model(), passes, recipe_overrides=ov)
    stats = res.report.passes[0].stats
    w = stats["weights"]
    assert w["onnx::MatMul_300"]["node"] == "/encoder/layer.0/attention/self/query/MatMul"
    assert w["onnx::MatMul_300"]["nnz_after"] == 3072  # layer 0: 25% of 4096 zeroed
    assert w["onnx::MatMul_306"]["nnz_after"] == 2048  # layer 1: the pass's 50%
    assert stats["skipped"] == {"onnx::MatMul_305": "skipped by a recipe layer override",
                                "onnx::MatMul_311": "skipped by a recipe layer override"}
    assert np.count_nonzero(res.model.get_array("onnx::MatMul_305")) == 128 * 64


def test_overrides_for_a_pass_that_takes_none_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    passes, ov = load_recipe(_recipe(tmp_path, '[[pass]]\nname = "channels"\n[pass.layers]\n"x" = { ratio = 0.1 }\n'))
    with pytest.raises(PipelineError, match="channels does not take per-layer overrides.*masks, nm"):
        onnxprune.optimize(_model(), passes, recipe_overrides=ov)
    src = tmp_path / "m.onnx"
    onnx.save(exporter_names(build_transformer_block()), str(src))
    assert main(["optimize", str(src), "--recipe", str(tmp_path / "r.toml")]) == 2
    assert "does not take per-layer overrides" in capsys.readouterr().err
    assert not (tmp_path / "m.pruned.onnx").exists()


def test_passes_lists_options_one_way_and_who_takes_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    blocks = {b.split(":", 1)[0]: b for b in ("\n" + out).split("\n") if b and not b.startswith(" ")}
    assert "masks" in blocks and "channels" in blocks
    text = out.split("\n")
    opt_lines = [ln for ln in text if ln.startswith("    ") and "overrides" not in ln]
    assert opt_lines and all(" default " in ln for ln in opt_lines)
    assert not any(" choices: " in ln for ln in opt_lines)  # one form: "(one of: ...)" after the help
    over = {}
    current = None
    for ln in text:
        if ln and not ln.startswith(" "):
            current = ln.split(":", 1)[0]
        elif "per-layer overrides" in ln:
            over[current] = "yes" in ln
    assert over["masks"] and over["nm"] and not over["channels"] and not over["heads"]

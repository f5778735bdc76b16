"""Hostile and broken inputs: one-line errors, exit code 2, nothing written, input untouched.

Each corpus case (``scripts/hostile_corpus.py``) is run through the CLI in-process
(``onnxprune.cli.main``), through the Python API (``onnxprune.load`` / ``optimize``) and through the
field-by-field parser used for files over 64 MB. Hypothesis mutates the bytes of a valid model
(overwrite, truncate, insert): the result is a one-line ``OnnxPruneError`` or a model that cleans,
saves and reloads. Every pass must leave an initializer that is also a graph input untouched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import (
    ModelLoadError,
    OnnxPruneError,
    PipelineError,
    UnsupportedModelError,
)
from scripts.hostile_corpus import Case, _builders, _tiny_model, digest

BUILDERS = dict(_builders())
REFUSED = [k for k in BUILDERS if k != "init_is_input"]


def _make(tmp_path: Path, key: str) -> Case:
    folder = tmp_path / "in"
    folder.mkdir()
    return BUILDERS[key](folder)


def _snapshot(case: Case) -> tuple[list[str | None], set[str]]:
    return [digest(p) for p in (case.input, *case.extra_files)], set(os.listdir(case.input.parent))


@pytest.mark.parametrize("key", REFUSED)
def test_cli_refuses_with_one_line(tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    case = _make(tmp_path, key)
    outdir = tmp_path / "out"
    outdir.mkdir()
    digests, listing = _snapshot(case)
    code = main(["optimize", str(case.input), "--passes", case.passes, "-o", str(outdir / "out.onnx")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in case.expect_words:
        assert word in lines[0].lower(), (word, lines[0])
    assert os.listdir(outdir) == [], "output or temp file left behind"
    assert _snapshot(case) == (digests, listing), "input folder changed"


@pytest.mark.parametrize("key", REFUSED)
def test_api_raises_onnxprune_error(tmp_path: Path, key: str) -> None:
    case = _make(tmp_path, key)
    digests, listing = _snapshot(case)
    with pytest.raises(OnnxPruneError) as info:
        model = onnxprune.load(case.input)
        onnxprune.optimize(model, case.passes)
    msg = str(info.value)
    assert "\n" not in msg
    for word in case.expect_words:
        assert word in msg.lower(), (word, msg)
    assert _snapshot(case) == (digests, listing)


def test_initializer_that_is_graph_input_is_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    case = _make(tmp_path, "init_is_input")
    digests, _ = _snapshot(case)
    with caplog.at_level(logging.WARNING):
        model = onnxprune.load(case.input)
    assert any("'W'" in r.getMessage() or " W" in r.getMessage() for r in caplog.records)
    assert not model.is_constant("W") and model.is_constant("B")
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(case.input), "--passes", "cleanup", "-o", str(out), "-q"]) == 0
    saved = onnxprune.load(out)
    assert "W" in saved.graph_input_names() and saved.initializer("W") is not None
    np.testing.assert_array_equal(saved.get_array("W"), model.get_array("W"))
    assert _snapshot(case)[0] == digests


def test_error_types(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        onnxprune.load(tmp_path / "nope.onnx")
    p = tmp_path / "opset6.onnx"
    p.write_bytes(_tiny_model(opset=6).SerializeToString())
    with pytest.raises(UnsupportedModelError, match="opset 6"):
        onnxprune.load(p)
    q = tmp_path / "ok.onnx"
    q.write_bytes(_tiny_model().SerializeToString())
    model = onnxprune.load(q)
    with pytest.raises(PipelineError, match="nosuch"):
        onnxprune.optimize(model, "nosuch")
    with pytest.raises(PipelineError, match="max_fold_mb"):
        onnxprune.optimize(model, "cleanup(max_fold_mb=-3)")


def test_masks_sparsity_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    passes = onnxprune.registered_passes()
    name = next((n for n in ("masks", "unstructured", "magnitude") if n in passes), None)
    if name is None:
        pytest.skip("no masks pass registered in this build")
    q = tmp_path / "ok.onnx"
    q.write_bytes(_tiny_model().SerializeToString())
    code = main(["optimize", str(q), "--passes", f"{name}(sparsity=1.5)", "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "sparsity" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_refuses_to_overwrite_input_without_inplace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q = tmp_path / "m.onnx"
    q.write_bytes(_tiny_model().SerializeToString())
    before = digest(q)
    assert main(["optimize", str(q), "--passes", "cleanup", "-o", str(q)]) == 2
    assert "inplace" in capsys.readouterr().err
    assert digest(q) == before
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_missing_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q = tmp_path / "m.onnx"
    q.write_bytes(_tiny_model().SerializeToString())
    assert main(["optimize", str(q), "--passes", "cleanup", "-o", str(tmp_path / "no" / "o.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_failing_check_leaves_no_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A --check whose inputs do not fit the model fails before anything is written."""
    q = tmp_path / "m.onnx"
    q.write_bytes(_tiny_model().SerializeToString())
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=np.zeros((2, 3), np.float32))
    out = tmp_path / "o.onnx"
    code = main(["optimize", str(q), "--passes", "cleanup", "--check", "--check-inputs", str(bad), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "'X'" in err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["bad.npz", "m.onnx"]


def test_hostile_corpus_script_runs_clean(tmp_path: Path) -> None:
    """The corpus script itself: every case behaves (one subprocess per case)."""
    from scripts.hostile_corpus import build_corpus, run_case

    cases = build_corpus(tmp_path / "corpus")
    picks = [c for c in cases if c.input.parent.name in ("truncated", "ext_escape", "cycle", "init_is_input")]
    outcomes = [run_case(c, tmp_path / "out" / c.input.parent.name) for c in picks]
    assert len(outcomes) == 4
    assert all(not o.problems for o in outcomes), [(o.case.name, o.problems) for o in outcomes]


@pytest.mark.parametrize("name", sorted(set(onnxprune.registered_passes()) - {"tensorrt"}))
def test_no_pass_touches_an_overridable_initializer(name: str) -> None:
    """An initializer that is also a graph input may be replaced at run time: every pass leaves it be."""
    from onnx import TensorProto, helper

    from onnxprune.ir.load import from_proto

    proto = _tiny_model(big=True)
    proto.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [64, 64]))
    model = from_proto(proto)
    try:
        result = onnxprune.optimize(model, name)
    except OnnxPruneError as exc:
        assert str(exc) and "\n" not in str(exc)  # a clear refusal is fine
        return
    assert [i.name for i in result.model.graph.input] == ["X", "W"]
    out = result.model.get_array("W")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, model.get_array("W"))


@pytest.mark.parametrize("key", ["truncated", "ext_escape", "cycle", "fifo"])
@pytest.mark.parametrize("command", ["inspect", "check"])
def test_inspect_and_check_refuse_too(tmp_path: Path, key: str, command: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    case = _make(tmp_path, key)
    good = tmp_path / "good.onnx"
    good.write_bytes(_tiny_model(big=True).SerializeToString())
    argv = ["inspect", str(case.input)] if command == "inspect" else ["check", str(good), str(case.input)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]


@pytest.mark.parametrize("key", REFUSED)
def test_streaming_parser_refuses_too(tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same corpus through the field-by-field parser used for files over 64 MB (forced here)."""
    import onnxprune.ir.load as load_mod

    if not hasattr(load_mod, "STREAM_PARSE_BYTES"):
        pytest.skip("this build has no streaming parser")
    monkeypatch.setattr(load_mod, "STREAM_PARSE_BYTES", 100)
    monkeypatch.setattr(load_mod, "INLINE_REF_BYTES", 1000, raising=False)
    case = _make(tmp_path, key)
    digests, listing = _snapshot(case)
    with pytest.raises(OnnxPruneError) as info:
        onnxprune.optimize(onnxprune.load(case.input), case.passes)
    assert "\n" not in str(info.value)
    for word in case.expect_words:
        assert word in str(info.value).lower(), (word, str(info.value))
    assert _snapshot(case) == (digests, listing)


def test_invalid_utf8_name_is_a_load_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by byte-mutation fuzzing: a corrupt name made onnx.checker raise UnicodeDecodeError."""
    data = _tiny_model().SerializeToString()
    assert data.count(b"MatMul") == 1
    bad = tmp_path / "bad_utf8.onnx"
    bad.write_bytes(data.replace(b"MatMul", b"Ma\xc9Mul", 1))  # the op type of node mm
    with pytest.raises(ModelLoadError, match="UTF-8"):
        onnxprune.load(bad)
    assert main(["optimize", str(bad), "--passes", "cleanup", "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "UTF-8" in err[0]


_SEED_MODEL = None


def _seed_bytes() -> bytes:
    global _SEED_MODEL
    if _SEED_MODEL is None:
        from models import build_cnn

        _SEED_MODEL = build_cnn(seed=1, width=8, size=8).SerializeToString()
    return _SEED_MODEL




@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_byte_mutations_refuse_or_roundtrip(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """Random bit rot (overwritten bytes, truncation, insertion): a one-line OnnxPruneError or a model
    that cleans, saves and reloads; never another exception."""
    raw = bytearray(_seed_bytes())
    kind = data.draw(st.sampled_from(["overwrite", "truncate", "insert"]))
    if kind == "overwrite":
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(1, len(raw) - 1))]
    else:
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=12))
    d = tmp_path_factory.mktemp("mut")
    src = d / "m.onnx"
    src.write_bytes(bytes(raw))
    try:
        result = onnxprune.optimize(onnxprune.load(src), "cleanup")
        onnxprune.save(result.model, d / "o.onnx")
    except OnnxPruneError as exc:
        assert str(exc) and "\n" not in str(exc)
        assert not (d / "o.onnx").exists()
        return
    onnxprune.load(d / "o.onnx")
    assert src.read_bytes() == bytes(raw)

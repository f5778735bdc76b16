"""``inspect`` and weight names (issue 15, points 3 and 8): the consuming node's name beside every
weight, the graph inputs/outputs with their dynamic dims, ``--dim``, modes that print only their
part, long reasons footnoted once, group names that keep the part that tells them apart.

The model is the builder transformer renamed the way ``torch.onnx`` names things
(:func:`models.exported.exporter_names`: weights ``onnx::MatMul_300``..., nodes
``/encoder/layer.0/intermediate/dense/MatMul``...), so a weight's own name says nothing about where it sits.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from models import build_transformer_block
from models.exported import exporter_names
from onnxprune.analysis.channels.groups import format_groups
from onnxprune.analysis.weights import weight_label, weight_labels, weight_nodes
from onnxprune.cli import main
from onnxprune.fmt import Footnotes, fmt_bytes
from onnxprune.ir.io import graph_io
from onnxprune.ir.load import from_proto


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inspect") / "exported.onnx"
    onnx.save(exporter_names(build_transformer_block(layers=2)), str(path))
    return path


def test_weight_nodes_name_every_weight_by_its_consumer(exported: Path) -> None:
    model = from_proto(onnx.load(str(exported)))
    nodes = weight_nodes(model)
    assert nodes["onnx::MatMul_304"] == "/encoder/layer.0/intermediate/dense/MatMul"
    assert nodes["onnx::MatMul_311"] == "/encoder/layer.1/output/dense/MatMul"
    assert nodes["layer0.ffn.up.bias"] == "/encoder/layer.0/intermediate/dense/add/Add"  # not a weight op: first reader
    labels = weight_labels(model, ["onnx::MatMul_304", "layer0.ffn.up.bias"])
    assert labels["onnx::MatMul_304"] == "/encoder/layer.0/intermediate/dense/MatMul (onnx::MatMul_304)"
    assert weight_label("layer0.q.weight", "layer0.q") == "layer0.q.weight"  # already says where it is


def test_inspect_lists_node_names_and_io(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(exported)]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if "onnx::MatMul_305" in ln]
    assert rows and all("/encoder/layer.0/output/dense/MatMul" in ln for ln in rows)  # both tables
    assert "input  input_ids" in out and "[batch, seq]" in out
    assert "output last_hidden_state" in out
    assert "dynamic dims: batch, seq" in out
    assert " MB" not in out and "KiB" in out  # binary sizes say so


def test_inspect_dim_resolves_and_unknown_dim_is_an_error(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(exported), "--dim", "seq=128"]) == 0
    assert "[batch, seq=128]" in capsys.readouterr().out
    assert main(["inspect", str(exported), "--dim", "sequence=128"]) == 2
    err = capsys.readouterr().err
    assert "sequence" in err and "batch, seq" in err


def test_inspect_json_has_io_and_nodes(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(exported), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in doc["inputs"]] == ["input_ids", "attention_mask"]
    assert doc["inputs"][0]["shape"] == ["batch", "seq"] and doc["inputs"][0]["dynamic"] == ["batch", "seq"]
    rows = {r["name"]: r for r in doc["summary"]["per_initializer"]}
    assert rows["onnx::MatMul_300"]["node"] == "/encoder/layer.0/attention/self/query/MatMul"


def test_inspect_mode_prints_only_its_part(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(exported), "--groups"]) == 0
    out = capsys.readouterr().out
    assert "channel groups:" in out
    assert "initializers:" not in out and "prunable weights:" not in out and "ops:" not in out
    assert out.splitlines()[2].startswith("channel groups:")  # header line, blank, the section


def test_groups_keep_the_distinguishing_part_and_footnote_reasons() -> None:
    reason = "LayerNormalization node '/encoder/layer.0/attn/ln' normalises over the channel axis " * 3
    groups = [{"group": f"/model/encoder/layer.{i}/attention/self/query/MatMul_output_0[0:16]", "width": 16,
               "prunable": False, "approximate": False, "reason": reason.strip(), "members": ["a", "b"]}
              for i in range(24)]
    text = format_groups({"groups": groups, "total": 24, "prunable": 0})
    rows = [ln for ln in text.splitlines() if "attention/self/query" in ln]
    assert len(rows) == 24 and len({ln.split()[0] for ln in rows}) == 24  # 24 names that differ
    assert all(f"layer.{i}/" in rows[i] for i in range(24))
    assert text.count(reason.strip()) == 1 and all("[1]" in ln for ln in rows)  # footnoted once
    assert "start with /model/encoder/" in text


def test_footnotes_and_binary_units() -> None:
    notes = Footnotes(inline_max=10)
    assert notes.ref("short") == "short"
    assert notes.ref("a long reason indeed") == "[1]" == notes.ref("a long reason indeed")
    assert notes.ref("another long one") == "[2]"
    assert notes.lines() == ["[1] a long reason indeed", "[2] another long one"]
    assert fmt_bytes(3 * 1024 * 1024) == "3.00 MiB" and fmt_bytes(2048) == "2.00 KiB"


def test_graph_io_reads_fixed_named_and_unnamed_dims() -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, "seq", None])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    ins, outs = graph_io(g)
    assert ins[0].shape == (1, "seq", None) and ins[0].dynamic == ["seq", "?"]
    assert outs[0].shape is None


def test_pass_warnings_and_stats_name_the_node(exported: Path) -> None:
    import onnxprune

    res = onnxprune.optimize(from_proto(onnx.load(str(exported))), "nm(n=2,m=3)")  # K=64: no 2:3 groups
    assert any("/encoder/layer.0/attention/self/query/MatMul (onnx::MatMul_300): K=64 is not a multiple of m=3" in w
               for w in res.report.warnings)
    res = onnxprune.optimize(from_proto(onnx.load(str(exported))), "masks(sparsity=0.5)")
    assert res.report.passes[0].stats["weights"]["onnx::MatMul_311"]["node"] == "/encoder/layer.1/output/dense/MatMul"

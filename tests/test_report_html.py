"""Reports (issue 15, point 6): JSON carries the per-weight rows with node names, the report path
is printed, a failed check's report says why; the HTML page groups the prunable layers by block
in graph order, names them by their node, puts the changed ones first, and shows pass statistics
as tables, cards that say kept / removed, and the total time beside the passes' time."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest

import onnxprune
from models import build_mlp, build_transformer_block
from onnxprune.cli import main
from onnxprune.report_html import (
    block_of,
    chart_groups,
    layer_rows,
    render_html,
    stat_html,
)


def _torch_named_transformer(layers: int = 2) -> onnx.ModelProto:
    """The builder's transformer with node names as a torch export writes them
    (``/encoder/layer.0/attention/q/MatMul``) and weights named like ``onnx::MatMul_<n>``."""
    proto = build_transformer_block(seed=3, layers=layers)
    renames: dict[str, str] = {}
    for i, node in enumerate(proto.graph.node):
        m = re.match(r"layer(\d+)\.(attn|ffn)\.(\w+)$", node.name)
        if m:
            part = "attention" if m.group(2) == "attn" else "ffn"
            node.name = f"/encoder/layer.{m.group(1)}/{part}/{m.group(3)}/{node.op_type}"
        if node.op_type == "MatMul":
            for x in node.input:
                if x in {t.name for t in proto.graph.initializer} and x not in renames:
                    renames[x] = f"onnx::MatMul_{900 + len(renames)}"
    for t in proto.graph.initializer:
        t.name = renames.get(t.name, t.name)
    for node in proto.graph.node:
        node.input[:] = [renames.get(x, x) for x in node.input]
    return proto


@pytest.fixture
def bert_like(tmp_path: Path) -> Path:
    p = tmp_path / "bert_like.onnx"
    onnx.save(_torch_named_transformer(), p)
    return p


def test_block_rule() -> None:
    assert block_of("/inner/encoder/layer.3/attention/self/query/MatMul") == (
        "/inner/encoder/layer.3", "attention/self/query/MatMul")
    assert block_of("/resnet/encoder/stages.1/layers.0/shortcut/convolution/Conv") == (
        "/resnet/encoder/stages.1", "layers.0/shortcut/convolution/Conv")
    assert block_of("/h.5/attn/c_attn/MatMul") == ("/h.5", "attn/c_attn/MatMul")
    assert block_of("/inner/pooler/dense/Gemm") == ("/inner/pooler", "dense/Gemm")
    assert block_of("fc0") == ("(top level)", "fc0")
    assert block_of("block1.conv1") == ("block1", "conv1")
    assert block_of("/MatMul") == ("(top level)", "/MatMul")
    assert block_of("blocks.2.mlp.fc1") == ("blocks.2", "mlp.fc1")
    assert block_of(None) == ("(top level)", "")


def test_json_report_has_rows_with_node_names_without_html(bert_like: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = bert_like.parent
    assert main(["optimize", str(bert_like), "--passes", "ffn(ratio=0.5)", "-o", str(d / "o.onnx"),
                 "--report", str(d / "r.json")]) == 0
    out = capsys.readouterr().out
    assert f"wrote report {d / 'r.json'}" in out
    doc = json.loads((d / "r.json").read_text())
    rows = doc["before"]["per_initializer"]
    assert rows and doc["after"]["per_initializer"]
    by_name = {r["name"]: r for r in rows}
    up = next(r for r in rows if r["node"] == "/encoder/layer.1/ffn/up/MatMul")
    assert up["name"].startswith("onnx::MatMul_") and up["weight"] is True and up["order"] is not None
    assert all(r["weight"] is False for r in rows if r["name"].endswith("bias"))
    assert doc["failed"] is False and doc["failures"] == []
    assert doc["wall_seconds"] >= doc["total_seconds"] > 0
    assert len(by_name) == len(rows)
    # --json alone: the same rows on stdout, the report path on stderr (stdout stays JSON)
    assert main(["optimize", str(bert_like), "--passes", "ffn(ratio=0.5)", "-o", str(d / "o2.onnx"), "--json",
                 "--report", str(d / "r2.json")]) == 0
    captured = capsys.readouterr()
    doc2 = json.loads(captured.out)
    assert [r["name"] for r in doc2["after"]["per_initializer"]] == [r["name"] for r in doc["after"]["per_initializer"]]
    assert "wrote report" in captured.err


def test_failed_check_report_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "mlp.onnx"
    onnx.save(build_mlp(seed=1), src)
    code = main(["optimize", str(src), "--passes", "nm(n=2,m=4)", "--check", "--atol", "1e-9", "-q",
                 "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json")])
    assert code == 1 and not (tmp_path / "o.onnx").exists()
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["failed"] is True
    assert any("atol=1e-09" in f and "not written" in f for f in doc["failures"])
    assert main(["optimize", str(src), "--passes", "nm(n=2,m=4)", "--check", "--atol", "1e-9", "-q",
                 "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.html")]) == 1
    page = (tmp_path / "r.html").read_text()
    assert '<div class="fail">' in page and "atol=1e-09" in page
    assert "<b>random</b> inputs" in page  # the check ran on synthesised inputs and the page says so


def test_html_groups_by_block_changed_first_by_node_name(bert_like: Path) -> None:
    res = onnxprune.optimize(onnxprune.load(bert_like), "ffn(ratio=0.5)", per_layer=True)
    groups = chart_groups(layer_rows(res.report))
    assert [b for b, _ in groups] == ["/encoder/layer.0", "/encoder/layer.1"]
    for block, rows in groups:
        labels = [r["label"] for r in rows]
        # the FFN (changed) first, in graph order; then the untouched attention projections in graph order
        assert labels == ["ffn/up/MatMul", "ffn/down/MatMul", "attention/q/MatMul", "attention/k/MatMul",
                          "attention/v/MatMul", "attention/out/MatMul"], (block, labels)
        assert [r["changed"] for r in rows] == [True, True, False, False, False, False]
    page = render_html(res.report)
    chart = page[page.index("<svg"):page.index("</svg>")]
    assert "onnx::MatMul_" in chart  # the initializer name is in the tooltips...
    titles = re.sub(r"<title>.*?</title>", "", chart)
    assert "onnx::MatMul_" not in titles and titles.index  # ... and never a label("layer.0") < titles.index("layer.1")
    assert titles.index("ffn/up/MatMul") < titles.index("attention/q/MatMul")
    assert "12 layers in 2 blocks, 4 changed" in page


def test_html_cards_tables_and_times(bert_like: Path) -> None:
    res = onnxprune.optimize(onnxprune.load(bert_like), "ffn(ratio=0.5),nm(n=2,m=4)", per_layer=True)
    page = render_html(res.report)
    b, a = res.report.before, res.report.after
    assert "parameters kept" in page and f"{a.parameters:,} of {b.parameters:,} kept" in page
    assert f"{b.parameters - a.parameters:,} removed" in page
    assert f"{res.report.wall_seconds:.1f} s total" in page and "whole run" in page
    text = res.report.format()  # the terminal table too: the passes' total beside the whole run
    assert f"{'all passes':<14} {'':>7} {res.report.total_seconds:>8.2f}  whole run {res.report.wall_seconds:.2f} s" \
        in text
    # statistics are key / value rows, not a dict dump; per-weight stats are a table with node names
    assert "{&quot;" not in page and "{'" not in page
    assert "<td>weights pruned</td>" in page
    assert "/encoder/layer.0/ffn/up/MatMul</code> <span" in page


def test_stat_html_tables() -> None:
    html = stat_html({"w1": {"size": 8, "nnz_after": 4}, "w2": {"size": 16, "nnz_after": 8}}, {"w1": "/a/MatMul"})
    assert html.startswith("<table>") and "<th class=\"n\">nnz after</th>" in html
    assert "<code>/a/MatMul</code>" in html and "16" in html
    assert stat_html(list(range(40))).endswith("… and 16 more")
    assert stat_html({}) == "(none)" and stat_html(0.123456) == "0.1235"


def test_one_zero_more_in_a_large_layer_counts_as_changed() -> None:
    from onnxprune.report import Report
    from onnxprune.summary import ModelSummary

    def summary(nonzero: int) -> ModelSummary:
        rows = [{"name": "w", "shape": [1000, 1000], "size": 10**6, "nonzero": nonzero, "node": "/l.0/fc/MatMul",
                 "order": 0, "weight": True}]
        return ModelSummary(nodes=1, ops={}, parameters=10**6, nonzero=nonzero, weight_bytes=4 * 10**6,
                            per_initializer=rows)

    rows = layer_rows(Report(before=summary(10**6), after=summary(10**6 - 1)))
    assert rows[0]["changed"] and rows[0]["block"] == "/l.0" and rows[0]["label"] == "fc/MatMul"
    assert not layer_rows(Report(before=summary(10**6), after=summary(10**6)))[0]["changed"]

"""Shape edits stay private to the reader they are meant for (issue 12, class 4 follow-up).

The dynamo exporter builds Reshape targets as ``Concat`` of small shared int pieces (one ``[16]``
head-dim constant read by the Q/K/V reshapes of every layer, one Concat output read by several
Reshapes). Before, ``channels`` edited that one piece for every group: on a dynamic-shape dynamo
BERT both layers' groups shrank the shared ``[16]`` to ``[6]`` and the model no longer ran (or,
with the right sizes, computed something else). Here: a hand-built graph with both kinds of
sharing plus an unrelated reader, the plan-time block for a piece that cannot be privatised, the
in-pass masked-twin check (``verify_twin``), and (slow) dynamo exports of BERT / GPT-2 / ViT
checked against the masked twin of every pass's plan.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnxprune.passes.channels as channels_pass
import onnxprune.passes.heads as heads_pass
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import optimize
from onnxprune.analysis.channels.groups import build_groups
from onnxprune.analysis.channels.prepare import prepare
from onnxprune.analysis.removal import (
    PruneGroup,
    ShapeEdit,
    edit_sharing_problem,
    mask_group,
    plan_problems,
)
from onnxprune.check import run_model
from onnxprune.errors import PassError
from onnxprune.ir.load import from_proto


def _shared_pieces(piece_is_input: bool = False):  # noqa: ANN202 - returns an onnx.ModelProto
    """Three prunable branches and one unrelated reader, all built from one ``[6]`` piece.

    A and C read the same Concat output; B has its own Concat of the same pieces; U reshapes a
    graph input (not prunable) with a third Concat of them.
    """
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([6], np.int64), "p6")]
    nodes = [helper.make_node("Shape", ["x"], ["batch"], end=1, name="shape_x"),  # a run-time piece, as dynamo's
             helper.make_node("Concat", ["batch", "p6"], ["t_ac"], axis=0, name="concat_ac"),
             helper.make_node("Concat", ["batch", "p6"], ["t_b"], axis=0, name="concat_b"),
             helper.make_node("Concat", ["batch", "p6"], ["t_u"], axis=0, name="concat_u")]
    outputs = []
    for br, target in (("a", "t_ac"), ("b", "t_b"), ("c", "t_ac")):
        inits += [numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), f"w_{br}"),
                  numpy_helper.from_array(rng.standard_normal(6).astype(np.float32) + 0.5, f"b_{br}"),
                  numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), f"w2_{br}")]
        nodes += [helper.make_node("MatMul", ["x", f"w_{br}"], [f"m_{br}"], name=f"mm_{br}"),
                  helper.make_node("Add", [f"m_{br}", f"b_{br}"], [f"h_{br}"], name=f"add_{br}"),
                  helper.make_node("Relu", [f"h_{br}"], [f"r_{br}"], name=f"relu_{br}"),
                  helper.make_node("Reshape", [f"r_{br}", target], [f"s_{br}"], name=f"reshape_{br}"),
                  helper.make_node("MatMul", [f"s_{br}", f"w2_{br}"], [f"y_{br}"], name=f"mm2_{br}")]
        outputs.append(helper.make_tensor_value_info(f"y_{br}", TensorProto.FLOAT, [2, 5]))
    nodes.append(helper.make_node("Reshape", ["z", "t_u"], ["y_u"], name="reshape_u"))
    outputs.append(helper.make_tensor_value_info("y_u", TensorProto.FLOAT, [2, 6]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
              helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 6])]
    if piece_is_input:  # an overridable initializer: it cannot be copied
        inputs.append(helper.make_tensor_value_info("p6", TensorProto.INT64, [1]))
    graph = helper.make_graph(nodes, "shared_pieces", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((2, 8)).astype(np.float32), "z": rng.standard_normal((2, 6)).astype(np.float32)}


def _twin_of_pass(proto, ratio: float):  # noqa: ANN001, ANN202 - the masked twin of the pass's selection
    twin = from_proto(proto)
    prepare(twin)
    groups = [g for g in build_groups(twin, prepare_model=False) if g.prunable]
    scores = {g.name: channels_pass.norm_scores(twin, g, 2) for g in groups}
    for g, ch in channels_pass.select(groups, scores, channels_pass.ChannelsOptions(ratio=ratio)):
        mask_group(twin, g, ch)
    return twin


def test_prepare_gives_every_shape_input_its_own_pieces() -> None:
    model = from_proto(_shared_pieces())
    prepare(model)
    reads = Counter(x for n in model.graph.node for x in n.input)
    targets = [n.input[1] for n in model.graph.node if n.op_type == "Reshape"]
    assert len(set(targets)) == 4  # A and C no longer share one Concat output
    producer = {o: n for n in model.graph.node for o in n.output}
    pieces = [producer[t].input[1] for t in targets]
    assert len(set(pieces)) == 4 and all(reads[p] == 1 for p in pieces)
    for g in build_groups(model, prepare_model=False):
        for e in g.shape_edits:
            assert edit_sharing_problem(model, e.target) is None


def test_shared_concat_pieces_prune_exactly() -> None:
    proto = _shared_pieces()
    feeds = _feeds()
    dense = run_model(from_proto(proto), feeds)
    res = optimize(from_proto(proto), "channels(ratio=0.34)")
    stats = res.report.passes[0].stats
    assert stats["groups_pruned"] == 3 and stats["channels_removed"] == 6 and "blocked_at_apply" not in stats
    assert stats["twin_check"] == "ok"
    out = run_model(res.model, feeds)
    twin = run_model(_twin_of_pass(proto, 0.34), feeds)
    for k in ("y_a", "y_b", "y_c"):
        np.testing.assert_allclose(out[k], twin[k], rtol=1e-5, atol=1e-5)
        assert np.abs(out[k] - dense[k]).max() > 1e-3  # the removal mattered
    np.testing.assert_array_equal(out["y_u"], dense["y_u"])  # the unrelated reader still sees [-1, 6]
    # copies that ended up equal are merged back: A, B and C all read [batch, 4] now, U keeps [batch, 6]
    assert len(res.model.graph.node) <= len(proto.graph.node)
    assert sorted(res.model.get_array(t.name).tolist() for t in res.model.graph.initializer
                  if t.data_type == TensorProto.INT64) == [[4], [6]]


def test_piece_that_is_a_graph_input_is_not_copied_and_refused() -> None:
    model = from_proto(_shared_pieces(piece_is_input=True))
    prepare(model)
    # an overridable value stays one tensor (the Concat read by A and C is still cloned)
    assert sum("p6" in n.input for n in model.graph.node) == 4
    assert not [t.name for t in model.graph.initializer if t.name.startswith("p6_")]
    assert "'p6' is a graph input" in edit_sharing_problem(model, "p6")
    g = PruneGroup("g", 6, shape_edits=[ShapeEdit("initializer", "p6", 0, 1)])
    assert "graph input" in plan_problems(model, [(g, np.array([0]))])["g"]


def test_edit_of_a_shared_piece_is_refused() -> None:
    model = from_proto(_shared_pieces())  # not prepared: p6 feeds three Concats
    assert "shared" in edit_sharing_problem(model, "p6")
    g = PruneGroup("g", 6, shape_edits=[ShapeEdit("initializer", "p6", 0, 1)])
    (reason,) = plan_problems(model, [(g, np.array([0]))]).values()
    assert "'p6' is shared" in reason and "Concat 'concat_ac'" in reason


def test_twin_check_fails_a_wrong_removal(monkeypatch) -> None:  # noqa: ANN001
    real = channels_pass.apply_removal

    def corrupt(model, removals):  # noqa: ANN001, ANN202 - a removal that also edits an unrelated tensor
        stats = real(model, removals)
        model.set_array("w2_a", np.asarray(model.get_array("w2_a")) * 2)
        return stats

    monkeypatch.setattr(channels_pass, "apply_removal", corrupt)
    with pytest.raises(PassError, match=r"disagrees with its masked twin: output 'y_a'.*groups pruned: .*m_a"):
        optimize(from_proto(_shared_pieces()), "channels(ratio=0.34)")
    res = optimize(from_proto(_shared_pieces()), "channels(ratio=0.34,verify_twin=false)")
    assert "twin_check" not in res.report.passes[0].stats


# ---------------------------------------------------------------------- real dynamo exports
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bert", "gpt2", "vit"])
@pytest.mark.parametrize("exporter", ["dynamo-dynamic", "dynamo", "legacy"])
def test_torch_exports_equal_masked_twin(arch: str, exporter: str, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    import warnings

    from tests.test_heads import _export, _tiny

    path = str(tmp_path / f"{arch}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _export(arch, exporter, path)
    seen: dict[str, object] = {}
    for mod in (channels_pass, heads_pass):  # record the masked twin of what each pass removes
        def wrap(model, removals, _real=mod.apply_removal):  # noqa: ANN001, ANN202
            removals = list(removals)
            twin = model.copy()
            for g, ch in removals:
                mask_group(twin, g, ch)
            seen["twin"] = twin
            return _real(model, removals)
        monkeypatch.setattr(mod, "apply_removal", wrap)
    from onnxprune import load

    model = load(path)
    feeds = {i.name: np.asarray(v) for i, v in zip(model.graph.input, _tiny(arch)[1])}
    pruned_any = 0
    for spec in ("channels(ratio=0.3)", "heads(ratio=0.25)", "ffn(ratio=0.25)"):
        seen.clear()
        res = optimize(load(path), spec.replace(")", ",verify_twin=false)"))  # the oracle here is independent
        stats = res.report.passes[0].stats
        assert "blocked_at_apply" not in stats and "blocks_blocked_at_apply" not in stats, stats
        if "twin" not in seen:
            continue
        pruned_any += 1
        a, b = run_model(seen["twin"], feeds), run_model(res.model, feeds)
        for k in a:
            assert a[k].shape == b[k].shape
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-4)
    assert pruned_any >= 2

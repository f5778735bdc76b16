"""Global selection with tied (dead) scores removes exactly the requested count (issue 12, class 9)."""

from __future__ import annotations

import numpy as np

from models import build_cnn, build_mlp, random_inputs
from onnxprune.analysis.channels.groups import build_groups
from onnxprune.check import run_model
from onnxprune.criteria.structured import select
from onnxprune.ir.load import from_proto
from onnxprune.pipeline.base import PassContext
from onnxprune.pipeline.manager import PassManager
from onnxprune.pipeline.spec import parse_pipeline

DEAD = {"block1.conv1": ("block1.bn1", [1, 3, 5, 7])}


def test_select_global_ties_removes_exact_count() -> None:
    scores = [np.zeros(10), np.zeros(6), np.ones(8)]
    out = select(scores, 0.25, scope="global")
    assert sum(o.size for o in out) == 6  # round(0.25 * 24), all from the zero groups
    assert out[2].size == 0 and out[0].tolist() == list(range(6))  # ties: group index, then channel


def test_channels_global_removes_planted_dead_channels_first() -> None:
    proto = build_cnn()
    model = from_proto(proto)
    for conv, (bn, chans) in DEAD.items():
        w = model.get_array(f"{conv}.weight").copy()
        w[chans] = 0
        model.set_array(f"{conv}.weight", w)
        for p in ("weight", "bias"):
            a = model.get_array(f"{bn}.{p}").copy()
            a[chans] = 0
            model.set_array(f"{bn}.{p}", a)
    total = sum(g.width for g in build_groups(model.copy()) if g.prunable)
    n_dead = sum(len(c) for _, c in DEAD.values())
    feeds = random_inputs(proto)
    ref = run_model(model, feeds)
    out, records = PassManager(parse_pipeline(f"channels(ratio={n_dead / total},scope=global,criterion=bn_scale)")
                               ).run(model.copy(), PassContext())
    assert records[-1].stats["channels_removed"] == n_dead
    widths = {n.name: int(out.initializer(n.input[1]).dims[0]) for n in out.graph.node if n.op_type == "Conv"}
    assert widths["block1.conv1"] == 16 - 4
    got = run_model(out, feeds)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_masks_global_with_tied_zeros_hits_exact_sparsity() -> None:
    model = from_proto(build_mlp())
    names = [t.name for t in model.graph.initializer if len(t.dims) == 2]
    w = model.get_array(names[0]).copy()
    w.reshape(-1)[: w.size // 2] = 0  # many exactly tied zeros
    model.set_array(names[0], w)
    out, records = PassManager(parse_pipeline("masks(sparsity=0.4,scope=global,min_keep=0.0)")).run(model, PassContext())
    stats = records[-1].stats
    size = sum(int(np.prod(out.initializer(n).dims)) for n in names)
    zeros = sum(int((out.get_array(n) == 0).sum()) for n in names)
    assert zeros == int(np.floor(0.4 * size)), stats

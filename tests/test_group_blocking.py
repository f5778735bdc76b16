"""A group whose removal plan cannot be applied is blocked with its reason; the rest is pruned (issue 12, class 4)."""

from __future__ import annotations

import numpy as np
import onnxprune.passes.channels as channels_pass
import pytest

from models import build_cnn, random_inputs
from onnxprune.analysis.removal import (
    PruneGroup,
    ShapeEdit,
    apply_removal,
    mask_group,
    plan_problems,
)
from onnxprune.check import run_model
from onnxprune.errors import PassError
from onnxprune.ir.load import from_proto
from onnxprune.pipeline.base import PassContext
from onnxprune.pipeline.manager import PassManager
from onnxprune.pipeline.spec import parse_pipeline


def test_plan_problems_names_the_shape_constant() -> None:
    model = from_proto(build_cnn())
    model.add_initializer("target", np.array([1, 4], np.int64))
    bad = PruneGroup("g", 8, shape_edits=[ShapeEdit("initializer", "target", 1, 2)])
    assert plan_problems(model, [(bad, np.arange(3))]) == {
        "g": "shape constant 'target'[1] = 4 would drop to -2"}
    with pytest.raises(PassError):
        apply_removal(model, [(bad, np.arange(3))])


def test_unappliable_group_blocked_rest_pruned(monkeypatch) -> None:  # noqa: ANN001
    real = channels_pass.build_groups

    def with_bad_target(model, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        groups = real(model, *a, **k)
        model.add_initializer("val_23", np.array([4], np.int64))  # a Reshape target piece that cannot shrink
        victim = next(g for g in groups if g.prunable and "block1.conv1" in " ".join(g.members + [g.name]))
        victim.shape_edits.append(ShapeEdit("initializer", "val_23", 0, 1))
        return groups

    monkeypatch.setattr(channels_pass, "build_groups", with_bad_target)
    proto = build_cnn()
    ctx = PassContext()
    out, records = PassManager(parse_pipeline("channels(ratio=0.5)")).run(from_proto(proto), ctx)
    stats = records[-1].stats
    (name, reason), = stats["blocked_at_apply"].items()
    assert reason == "shape constant 'val_23'[0] = 4 would drop to -4"
    assert any(name in w and "would drop" in w for w in ctx.warnings)
    widths = {n.name: int(out.initializer(n.input[1]).dims[0]) for n in out.graph.node if n.op_type == "Conv"}
    assert widths["block1.conv1"] == 16 and widths["stem.conv"] < 16
    # the pruned model equals the masked twin of what was removed
    twin = from_proto(proto)
    twin_groups = real(twin)
    scores = {g.name: channels_pass.norm_scores(twin, g, 2) for g in twin_groups if g.prunable}
    live = [g for g in twin_groups if g.prunable and g.name != name]
    for g, ch in channels_pass.select(live, scores, channels_pass.ChannelsOptions(ratio=0.5)):
        mask_group(twin, g, ch)
    feeds = random_inputs(proto)
    a, b = run_model(twin, feeds), run_model(out, feeds)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5)

"""`onnxprune demo`: the README's first quickstart command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import onnxprune
from onnxprune.cli import DEMO_PIPELINE, demo_pipeline, main


def test_demo_runs_and_calibration_beats_magnitude(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    written = tmp_path / "demo_cnn.pruned.onnx"
    assert written.is_file()
    pruned = onnxprune.load(written)
    dense = onnxprune.load(Path(onnxprune.__file__).parent / "data" / "demo_cnn.onnx")
    from onnxprune.summary import summarize

    before, after = summarize(dense), summarize(pruned)
    assert after.parameters < 0.8 * before.parameters  # channels removed
    assert after.nonzero < 0.5 * before.parameters  # and 2:4 masks on top
    m = re.search(r"cosine to the dense model ([0-9.]+) \(calibration-aware: ([0-9.]+)\)", out)
    assert m, out
    plain, calibrated = float(m.group(1)), float(m.group(2))
    assert calibrated > plain
    assert calibrated > 0.9


def test_demo_pipeline_lists_only_registered_passes() -> None:
    spec = demo_pipeline()
    assert spec.split(",")[0] == "cleanup"
    assert len(onnxprune.parse_pipeline(spec)) == len(DEMO_PIPELINE)

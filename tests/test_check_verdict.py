"""Verdicts on a comparison (kept / degraded / broken), the logit rule, and the CLI gates of
``check`` and ``optimize --check`` (issue 15, point 1; ``--atol`` without ``--check``, point 8)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from models import build_mlp, build_transformer_block, random_inputs
from onnxprune.check import (
    CheckResult,
    OutputDiff,
    compare,
    diff_outputs,
    is_logit_like,
    verdict,
)
from onnxprune.cli import main
from onnxprune.errors import CheckError
from onnxprune.ir.model import Model


def _diff(name: str = "y", cosine: float = 1.0, top1: float | None = None, pooled: float | None = None,
          shape: tuple[int, ...] = (2, 10)) -> OutputDiff:
    return OutputDiff(name, list(shape), list(shape), 0.1, 0.01, 0.1, cosine, top1, pooled)


def test_logit_rule() -> None:
    f = np.float32
    assert is_logit_like("logits", (4, 10), f)                      # [batch, classes]
    assert is_logit_like("output", (1, 1000), f)                    # a classifier's unnamed output
    assert is_logit_like("logits", (2, 16, 30522), f)               # LM / token-classification head
    assert not is_logit_like("last_hidden_state", (2, 16, 384), f)  # [B, S, H] hidden states
    assert not is_logit_like("output", (2, 16, 384), f)             # 3-D without a logit name
    assert not is_logit_like("pooler_output", (2, 768), f)          # [B, H] embedding
    assert not is_logit_like("sentence_embedding", (2, 384), f)
    assert not is_logit_like("features", (1, 64, 8, 8), f)          # NCHW feature map
    assert not is_logit_like("logits", (4, 1), f)                   # one class: argmax is constant
    assert not is_logit_like("labels", (4, 10), np.int64)           # not float
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 5, 8)).astype(np.float32)
    assert diff_outputs("last_hidden_state", h, h + 0.1).top1 is None
    lg = rng.standard_normal((6, 4)).astype(np.float32)
    assert diff_outputs("logits", lg, lg).top1 == 1.0


def test_verdict_statuses_and_thresholds() -> None:
    kept = verdict(CheckResult([_diff(cosine=0.9995, top1=1.0)], {"x": [2, 4]}))
    assert kept.status == "kept" and kept.failures == []
    assert "cosine >= 0.99" in kept.line and "top1 >= 0.99" in kept.line and kept.line.startswith("verdict: kept")
    degraded = verdict(CheckResult([_diff(cosine=0.95, top1=1.0)], {"x": [2, 4]}))
    assert degraded.status == "degraded" and "cosine 0.9500 < 0.99" in degraded.failures[0]
    # the README pipeline on real MiniLM gave cosine 0.276: that is broken, not a pass
    ruined = verdict(CheckResult([_diff("last_hidden_state", cosine=0.276, shape=(2, 8, 384))], {"x": [2, 8]},
                                 synthesized=True))
    assert ruined.status == "broken" and "RANDOM" in ruined.line and "0.2760" in ruined.line
    assert verdict(CheckResult([_diff(cosine=0.999, top1=0.3)], {})).status == "broken"  # most argmaxes changed
    assert verdict(CheckResult([_diff(cosine=0.999, top1=0.9)], {})).status == "degraded"
    # a looser gate keeps what the default calls degraded; None turns a gate off
    assert verdict(CheckResult([_diff(cosine=0.95)], {}), min_cos=0.9).status == "kept"
    assert verdict(CheckResult([_diff(cosine=0.2, top1=0.1)], {}), min_cos=None, min_top1=None).status == "kept"
    # the pooled cosine (check --pool mean) is what the cosine gate reads when present
    pooled = CheckResult([_diff("last_hidden_state", cosine=0.9, pooled=0.995, shape=(2, 8, 64))], {})
    assert verdict(pooled).status == "kept" and "pooled cosine" in verdict(pooled).line
    # a changed shape is broken whatever the gates
    bad = OutputDiff("y", [2, 10], [2, 9], float("inf"), float("inf"), float("inf"), 0.0, None)
    assert verdict(CheckResult([bad], {}), min_cos=None, min_top1=None).status == "broken"
    with pytest.raises(CheckError, match="min-cos"):
        verdict(CheckResult([], {}), min_cos=1.5)


@pytest.fixture()
def ruined_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A transformer block and the same block with other random weights ([B, S, H] output)."""
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(build_transformer_block(seed=0), a)
    onnx.save(build_transformer_block(seed=5), b)
    return a, b


def test_cli_check_exits_1_on_a_ruined_model(ruined_pair: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    a, b = ruined_pair
    assert main(["check", str(a), str(b), "--dim", "batch=2", "--dim", "seq=8"]) == 1
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("inputs: RANDOM") and lines[-1].startswith("verdict: broken")
    assert "top1" not in lines[-1].split(":", 2)[-1]  # [B, S, H] hidden states: no top1 failure
    assert "verdict: broken" in out.err
    assert main(["check", str(a), str(a), "--dim", "batch=2", "--dim", "seq=8"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("verdict: kept")
    # given inputs say so; --json carries the verdict; the gates can be turned off
    np.savez(tmp_path / "in.npz", **random_inputs(build_transformer_block(seed=0), batch=2, seq=8))
    assert main(["check", str(a), str(b), "--inputs", str(tmp_path / "in.npz"), "--json",
                 "--min-cos", "none", "--min-top1", "none"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"]["status"] == "kept" and doc["synthesized_inputs"] is False
    assert doc["verdict"]["min_cos"] is None
    with pytest.raises(SystemExit) as exc:  # argparse: usage error, exit 2
        main(["check", str(a), str(b), "--inputs", str(tmp_path / "in.npz"), "--min-cos", "2"])
    assert exc.value.code == 2
    assert "[0, 1]" in capsys.readouterr().err


def test_optimize_check_gate_writes_nothing_and_reports_why(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    src, out, rep = tmp_path / "m.onnx", tmp_path / "m.out.onnx", tmp_path / "r.json"
    onnx.save(build_mlp(seed=1), src)
    argv = ["optimize", str(src), "--passes", "masks(sparsity=0.9)", "--check", "-o", str(out), "--report", str(rep)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "verdict: broken" in err and "was not written" in err and not out.exists()
    failures = json.loads(rep.read_text())["failures"]
    assert any("cosine" in f and "< 0.99" in f for f in failures)
    # the same run with a gate it meets is written and says kept
    assert main([*argv, "--min-cos", "0.0", "--min-top1", "0.0"]) == 0
    assert out.exists() and "verdict: kept (cosine >= 0, top1 >= 0" in capsys.readouterr().out


def test_optimize_check_pool_mean(ruined_pair: tuple[Path, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = ruined_pair
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(a), "--passes", "masks(sparsity=0.3)", "--check", "--pool", "mean", "--json",
                 "--min-cos", "0.5", "--min-top1", "none", "-o", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    (o,) = doc["check"]["outputs"]
    assert o["pooled_cosine"] is not None and 0.5 <= o["pooled_cosine"] < 1.0 and o["top1"] is None


@pytest.mark.parametrize("flag", [["--atol", "1e-3"], ["--rtol", "0.1"], ["--min-cos", "0.9"], ["--pool", "mean"]])
def test_check_only_flags_without_check_are_an_error(tmp_path: Path, flag: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(build_mlp(seed=1), src)
    assert main(["optimize", str(src), "--passes", "cleanup", "-o", str(out), *flag]) == 2
    assert f"{flag[0]} only act" in capsys.readouterr().err and not out.exists()


def test_compare_marks_synthesized_inputs() -> None:
    proto = build_mlp(seed=1)
    model = Model(proto)
    assert compare(model, model).synthesized is True
    feeds = random_inputs(proto, batch=2)
    res = compare(model, model, feeds=feeds)
    assert res.synthesized is False and res.format().splitlines()[0].startswith("inputs: given")

"""Plain progress lines on a non-terminal stderr, and a closed stdout (``| head``) (issue 15, point 9)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from models import build_mlp
from onnxprune import progress
from onnxprune.cli import EXIT_BROKEN_PIPE, main


class _Clock:
    """Advances by ``step`` seconds on every call."""

    def __init__(self, step: float) -> None:
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


@pytest.fixture()
def plain(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> pytest.CaptureFixture[str]:
    """Plain lines on, a fake clock; capsys' stderr is not a TTY."""
    monkeypatch.setattr(progress, "clock", _Clock(0.1))
    progress.set_plain(True)
    yield capsys
    progress.set_plain(False)


def test_plain_lines_are_throttled(plain: pytest.CaptureFixture[str]) -> None:
    items = list(range(1000))
    assert list(progress.progress(items, desc="calibration", unit="batch")) == items
    lines = plain.readouterr().err.splitlines()
    # 1000 batches at 0.1 s each: ~100 s -> a line after 2 s, then one per 10 s, and a last one
    assert 5 <= len(lines) <= 15, lines
    assert lines[0].startswith("calibration ") and "/1000 batches" in lines[0]
    assert lines[-1].startswith("calibration 1000/1000 batches done")


def test_short_loops_and_library_use_stay_silent(plain: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "clock", _Clock(0.001))
    progress.set_plain(True)
    assert list(progress.progress(range(50), desc="pruning", unit="layer")) == list(range(50))
    assert plain.readouterr().err == ""  # under FIRST_LINE_SECONDS: nothing
    progress.set_plain(False)  # the default outside the CLI: the iterable itself comes back
    items = [1, 2]
    assert progress.progress(items) is items


def test_cli_prints_stage_lines_unless_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(build_mlp(seed=1), src)
    monkeypatch.setattr(progress, "FIRST_LINE_SECONDS", 0.0)
    assert main(["optimize", str(src), "--passes", "cleanup,masks(sparsity=0.5)", "-o", str(tmp_path / "o.onnx"),
                 "--check", "--min-cos", "none", "--min-top1", "none"]) == 0
    err = capsys.readouterr().err
    assert "pass 1/2: cleanup" in err and "pass 2/2: masks" in err and "check: running" in err
    assert not progress.PLAIN  # main restores the library default
    assert main(["optimize", str(src), "--passes", "cleanup", "-o", str(tmp_path / "o2.onnx"), "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_closed_stdout_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    class Closed(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", Closed())
    assert main(["passes"]) == EXIT_BROKEN_PIPE
    assert "Broken pipe" not in capsys.readouterr().err


def test_pipe_closed_by_reader_subprocess() -> None:
    """``onnxprune passes | head -0``: the reader is gone before the first write."""
    p = subprocess.Popen([sys.executable, "-m", "onnxprune", "passes"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # type: ignore[union-attr]
    err = p.stderr.read().decode()  # type: ignore[union-attr]
    assert p.wait(timeout=120) == EXIT_BROKEN_PIPE
    assert "Broken pipe" not in err and "Exception ignored" not in err and err == ""

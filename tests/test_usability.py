"""Small things users hit (issue 15, point 8), each as it was seen: an external-data file given as
the model, ``--dim`` names a model lacks, ``--sparse-storage`` that cannot shrink 2:4, help texts,
``--version``, MiB labels, ``-v`` output, LICENSE, test skip messages (the demo's temp folder:
``tests/test_readme_examples.py``, which runs the README's ``onnxprune demo``)."""

from __future__ import annotations

import argparse
import ast
import logging
import re
import subprocess
from pathlib import Path

import onnx
import pytest

from models import build_mlp
from onnxprune.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def mlp(tmp_path: Path) -> Path:
    p = tmp_path / "mlp.onnx"
    onnx.save(build_mlp(), str(p))
    return p


def test_external_data_file_as_model_names_the_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "net.onnx"
    onnx.save(build_mlp(), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="net.onnx.data", size_threshold=0)
    assert main(["inspect", str(tmp_path / "net.onnx.data")]) == 2
    err = capsys.readouterr().err
    assert "is an external-data file" in err and str(src) in err and "corrupt" not in err
    assert main(["inspect", str(src)]) == 0  # the model itself loads


def test_dim_the_model_lacks_is_an_error(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(mlp), str(mlp), "--dim", "seq=8"]) == 2
    err = capsys.readouterr().err
    assert "--dim seq" in err and "batch" in err  # names the dims the model has
    assert main(["check", str(mlp), str(mlp), "--dim", "batch=3"]) == 0
    capsys.readouterr()
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(mlp), "-o", str(out), "--passes", "cleanup", "--dim", "seq=8"]) == 2
    assert "--dim seq" in capsys.readouterr().err and not out.exists()


def test_sparse_storage_that_cannot_shrink_says_so(mlp: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(mlp), "-o", str(out), "--passes", "nm(n=2,m=4)", "--sparse-storage"]) == 0
    text = capsys.readouterr().out
    assert "--sparse-storage: " in text and "2:4 (50% zeros) cannot shrink" in text
    assert "no weight was stored sparse" in text
    assert main(["optimize", str(mlp), "-o", str(out), "--passes", "masks(sparsity=0.9)", "--sparse-storage"]) == 0
    assert "--sparse-storage:" not in capsys.readouterr().out  # it shrank every candidate: nothing to say


def _actions(parser: argparse.ArgumentParser, path: str = "onnxprune") -> list[tuple[str, argparse.Action]]:
    out = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out += _actions(sub, f"{path} {name}")
        elif a.option_strings:
            out.append((path, a))
    return out


def test_every_option_has_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    missing = [f"{path} {'/'.join(a.option_strings)}" for path, a in _actions(build_parser()) if not a.help]
    assert missing == []
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert re.fullmatch(r"onnxprune \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_sizes_are_labelled_binary(mlp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["optimize", str(mlp), "-o", str(tmp_path / "o.onnx"), "--passes", "masks(sparsity=0.5)"]) == 0
    text = capsys.readouterr().out
    sizes = re.findall(r"\d+\.\d\d ([KMG]i?B)\b", text)
    assert sizes and all(u.endswith("iB") for u in sizes)


def test_verbose_prints_no_info_warnings_or_dict_dumps(mlp: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="onnxprune")
    # masks with include: the pass warns (a K that cannot hold 2:4 would too) and its stats hold dicts
    assert main(["-v", "optimize", str(mlp), "-o", str(tmp_path / "o.onnx"), "--passes",
                 "masks(sparsity=0.5),nm(n=2,m=4)", "--calib", str(_calib(tmp_path))]) == 0
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info  # -v does log
    assert not [m for m in info if m.lower().startswith("warning")]
    assert max(len(m) for m in info) < 1000 and not [m for m in info if "{'" in m and "nnz_before" in m]


def _calib(tmp_path: Path) -> Path:
    import numpy as np

    from models import random_inputs

    p = tmp_path / "c.npz"
    np.savez(p, **random_inputs(build_mlp(), batch=4))
    return p


def test_license_matches_pyproject() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()


_FILE = re.compile(r"\b([\w./-]+\.(?:md|toml|txt|json|rst))\b")


def _skip_texts(tree: ast.AST) -> list[str]:
    """String constants inside skip calls (``pytest.skip``, ``importorskip``, ``skipif``) and any
    string that tells the reader to ``see`` something."""
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and "skip" in ast.unparse(node.func):
            texts += [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "see " in node.value:
            texts.append(node.value)
    return texts


def test_skip_messages_name_files_that_exist() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    names = set(tracked) | {Path(t).name for t in tracked}
    bad = []
    for test in sorted((ROOT / "tests").glob("test_*.py")):
        for text in _skip_texts(ast.parse(test.read_text())):
            bad += [f"{test.name}: {m}" for m in _FILE.findall(text) if m not in names and not (ROOT / m).exists()]
    assert bad == []

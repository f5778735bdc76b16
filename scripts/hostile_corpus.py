"""Run a corpus of hostile and broken inputs through the ``onnxprune`` CLI and tabulate the result.

Usage::

    python scripts/hostile_corpus.py            # build the corpus in a temp folder, run, print a table
    python scripts/hostile_corpus.py --keep DIR # build it in DIR and keep it

Every case is run as ``python -m onnxprune optimize IN --passes SPEC -o OUT`` in a subprocess.
A case behaves when:

* a refused input exits with code 2, prints exactly one line on stderr that starts with
  ``error:`` and contains the expected words, and prints no traceback;
* no output file (``OUT``, ``OUT.data``) and no temporary file (``.*.tmp``) is left in the output
  folder;
* the input file (and any external data beside it) is byte-identical afterwards.

The one accepted case (an initializer that is also a graph input) must exit 0 with a warning that
names the initializer, and leave the input byte-identical.

The script exits 1 if any case misbehaves. The corpus builders (:func:`build_corpus`) are also
used by ``tests/test_hostile_inputs.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    """One corpus entry.

    Attributes:
        name: Short identifier.
        input: The path given to the CLI.
        passes: Pipeline spec.
        expect_exit: Expected exit code (2 for refused inputs).
        expect_words: Words (lower case) the error/warning line must contain.
        extra_files: Files beside the input that must stay byte-identical (external data).
    """

    name: str
    input: Path
    passes: str = "cleanup"
    expect_exit: int = 2
    expect_words: tuple[str, ...] = ()
    extra_files: tuple[Path, ...] = field(default_factory=tuple)


def _tiny_model(opset: int = 17, big: bool = False) -> onnx.ModelProto:
    """``Y = X @ W + B`` with a 4x8 (or 64x64 when ``big``) weight."""
    k, n = (64, 64) if big else (4, 8)
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["XW"], name="mm"),
         helper.make_node("Add", ["XW", "B"], ["Y"], name="add")],
        "tiny",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", n])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="corpus")
    model.ir_version = 8 if opset >= 7 else 3
    return model


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _external_model(folder: Path, name: str, location: str, offset: int | None = None,
                    length: int | None = None, data: bytes | None = None) -> Path:
    """A tiny model whose weight ``W`` points at external data ``location`` (relative to folder)."""
    model = _tiny_model(big=True)
    w = next(t for t in model.graph.initializer if t.name == "W")
    raw = w.raw_data
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    entries = [("location", location)]
    if offset is not None:
        entries.append(("offset", str(offset)))
    if length is not None:
        entries.append(("length", str(length)))
    for k, v in entries:
        e = w.external_data.add()
        e.key, e.value = k, v
    if data is not None:
        (folder / location).write_bytes(data if data != b"RAW" else raw)
    return _write(folder / name, model.SerializeToString())


def _builders() -> list[tuple[str, Callable[[Path], Case]]]:
    def missing(d: Path) -> Case:
        return Case("not a file", d / "does_not_exist.onnx", expect_words=("no such file",))

    def directory(d: Path) -> Case:
        sub = d / "a_folder.onnx"
        sub.mkdir()
        return Case("a directory", sub, expect_words=("directory",))

    def fifo(d: Path) -> Case:
        pipe = d / "pipe.onnx"
        os.mkfifo(pipe)  # opening it would block forever: must be refused without reading
        return Case("named pipe (would hang)", pipe, expect_words=("not a regular file",))

    def empty(d: Path) -> Case:
        return Case("empty file", _write(d / "empty.onnx", b""), expect_words=("empty",))

    def random_bytes(d: Path) -> Case:
        data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        return Case("random bytes", _write(d / "random.onnx", data), expect_words=("not",))

    def truncated(d: Path) -> Case:
        data = _tiny_model(big=True).SerializeToString()
        return Case("truncated protobuf", _write(d / "truncated.onnx", data[: len(data) // 2]),
                    expect_words=("truncated",))

    def tensor_proto(d: Path) -> Case:
        t = numpy_helper.from_array(np.arange(64, dtype=np.float32), "t")
        return Case("TensorProto, not a model", _write(d / "tensor.onnx", t.SerializeToString()),
                    expect_words=("not",))

    def graph_proto(d: Path) -> Case:
        g = _tiny_model().graph
        return Case("GraphProto, not a model", _write(d / "graph.onnx", g.SerializeToString()),
                    expect_words=("not",))

    def bad_utf8(d: Path) -> Case:
        data = _tiny_model().SerializeToString().replace(b"MatMul", b"Ma\xc9Mul", 1)
        return Case("name not valid UTF-8", _write(d / "utf8.onnx", data), expect_words=("utf-8",))

    def cycle(d: Path) -> Case:
        m = _tiny_model()
        m.graph.node[0].input[0] = "Y"  # mm reads add's output, add reads mm's output
        m.graph.node[0].input.append("X")
        m.graph.node[0].op_type = "Sum"
        return Case("cycle", _write(d / "cycle.onnx", m.SerializeToString()), expect_words=("cycle",))

    def undefined_input(d: Path) -> Case:
        m = _tiny_model()
        m.graph.node[1].input[1] = "nowhere"
        return Case("input never produced", _write(d / "undefined.onnx", m.SerializeToString()),
                    expect_words=("nowhere",))

    def duplicate_output(d: Path) -> Case:
        m = _tiny_model()
        m.graph.node.insert(1, helper.make_node("Relu", ["X"], ["XW"], name="dup"))
        return Case("duplicate tensor name", _write(d / "dup_tensor.onnx", m.SerializeToString()),
                    expect_words=("xw",))

    def duplicate_init(d: Path) -> Case:
        m = _tiny_model()
        m.graph.initializer.append(m.graph.initializer[1])
        return Case("duplicate initializer", _write(d / "dup_init.onnx", m.SerializeToString()),
                    expect_words=("duplicate", "b"))

    def init_is_input(d: Path) -> Case:
        m = _tiny_model()
        m.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 8]))
        return Case("initializer is also an input", _write(d / "init_input.onnx", m.SerializeToString()),
                    expect_exit=0, expect_words=("w", "graph input"))

    def ext_missing(d: Path) -> Case:
        return Case("external data file missing", _external_model(d, "ext_missing.onnx", "gone.bin"),
                    expect_words=("gone.bin", "missing"))

    def ext_offset(d: Path) -> Case:
        p = _external_model(d, "ext_offset.onnx", "short.bin", offset=1024, data=b"RAW")
        return Case("external data wrong offset", p, expect_words=("short.bin",), extra_files=(d / "short.bin",))

    def ext_length(d: Path) -> Case:
        p = _external_model(d, "ext_length.onnx", "len.bin", length=100, data=b"RAW")
        return Case("external data wrong length", p, expect_words=("len.bin", "length"), extra_files=(d / "len.bin",))

    def ext_escape(d: Path) -> Case:
        return Case("external data escapes folder", _external_model(d, "ext_escape.onnx", "../../etc/passwd"),
                    expect_words=("outside",))

    def ext_absolute(d: Path) -> Case:
        return Case("external data absolute path", _external_model(d, "ext_abs.onnx", "/etc/passwd"),
                    expect_words=("outside",))

    def ext_symlink(d: Path) -> Case:
        link = d / "link.bin"
        with tempfile.NamedTemporaryFile(delete=False, dir=d.parent, suffix=".bin") as f:
            f.write(b"\0" * (64 * 64 * 4))
        link.symlink_to(f.name)
        return Case("external data symlink out of folder", _external_model(d, "ext_link.onnx", "link.bin"),
                    expect_words=("outside",))

    def ext_constant_escape(d: Path) -> Case:
        m = _tiny_model()
        value = helper.make_tensor("c", TensorProto.FLOAT, [8], [0.0] * 8)
        value.ClearField("float_data")
        value.data_location = TensorProto.EXTERNAL
        for k, v in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "32")):
            e = value.external_data.add()
            e.key, e.value = k, v
        m.graph.node.append(helper.make_node("Constant", [], ["C"], value=value, name="const"))
        m.graph.node.append(helper.make_node("Add", ["Y", "C"], ["Z"], name="add2"))
        m.graph.output[0].name = "Z"
        return Case("Constant value escapes folder", _write(d / "const_escape.onnx", m.SerializeToString()),
                    expect_words=("outside",))

    def ext_subgraph_missing(d: Path) -> Case:
        m = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool c, float[8] x) => (float[8] y) {
            y = If(c) <then_branch = t () => (float[8] a) { a = Add(x, K) },
                       else_branch = e () => (float[8] b) { b = Identity(x) }>
        }""")
        k = numpy_helper.from_array(np.ones(8, np.float32), "K")
        k.ClearField("raw_data")
        k.data_location = TensorProto.EXTERNAL
        e = k.external_data.add()
        e.key, e.value = "location", "sub_missing.bin"
        m.graph.node[0].attribute[0].g.initializer.append(k)
        return Case("subgraph external data missing", _write(d / "sub_missing.onnx", m.SerializeToString()),
                    expect_words=("sub_missing.bin", "missing"))

    def sparse_out_of_range(d: Path) -> Case:
        m = _tiny_model()
        w = next(t for t in m.graph.initializer if t.name == "W")
        m.graph.initializer.remove(w)
        sp = m.graph.sparse_initializer.add()
        sp.values.CopyFrom(numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "W"))
        sp.indices.CopyFrom(numpy_helper.from_array(np.array([0, 99], np.int64), "W_indices"))
        sp.dims.extend([4, 8])
        return Case("sparse initializer index out of range", _write(d / "sparse.onnx", m.SerializeToString()),
                    expect_words=("sparse initializer 'w'", "outside"))

    def no_outputs(d: Path) -> Case:
        m = _tiny_model()
        del m.graph.output[:]
        return Case("graph without outputs", _write(d / "no_outputs.onnx", m.SerializeToString()),
                    expect_words=("no outputs",))

    def undefined_dtype(d: Path) -> Case:
        m = _tiny_model()
        m.graph.initializer[0].data_type = 0
        return Case("initializer of undefined type", _write(d / "undef.onnx", m.SerializeToString()),
                    expect_words=("'w'", "undefined data type"))

    def type_mismatch(d: Path) -> Case:
        m = _tiny_model()
        m.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64  # int64 @ float weight
        return Case("type mismatch (inference fails)", _write(d / "types.onnx", m.SerializeToString()),
                    expect_words=("inference", "types.onnx"))

    def unknown_op(d: Path) -> Case:
        m = _tiny_model()
        m.graph.node[1].op_type = "FooBar"
        return Case("unknown op in ai.onnx", _write(d / "unknown_op.onnx", m.SerializeToString()),
                    expect_words=("foobar",))

    def low_opset(d: Path) -> Case:
        return Case("opset 6", _write(d / "opset6.onnx", _tiny_model(opset=6).SerializeToString()),
                    expect_words=("opset 6",))

    def no_graph_nodes(d: Path) -> Case:
        m = onnx.ModelProto(ir_version=8)
        m.opset_import.add().version = 17
        return Case("model without graph", _write(d / "nograph.onnx", m.SerializeToString()),
                    expect_words=("graph",))

    def unknown_pass(d: Path) -> Case:
        p = _write(d / "ok_unknown_pass.onnx", _tiny_model().SerializeToString())
        return Case("unknown pass", p, passes="cleanup,nosuchpass", expect_words=("nosuchpass", "cleanup"))

    def unknown_option(d: Path) -> Case:
        p = _write(d / "ok_unknown_opt.onnx", _tiny_model().SerializeToString())
        return Case("unknown option", p, passes="cleanup(bogus=1)", expect_words=("bogus", "fold_constants"))

    def out_of_range(d: Path) -> Case:
        p = _write(d / "ok_range.onnx", _tiny_model().SerializeToString())
        return Case("option out of range", p, passes="cleanup(max_fold_mb=-1)", expect_words=("max_fold_mb",))

    def nan_option(d: Path) -> Case:
        p = _write(d / "ok_nan.onnx", _tiny_model().SerializeToString())
        return Case("option is NaN", p, passes="cleanup(max_fold_mb=nan)", expect_words=("max_fold_mb", "nan"))

    def sparsity_out_of_range(d: Path) -> Case:
        from onnxprune.pipeline.registry import registered_passes

        p = _write(d / "ok_sparsity.onnx", _tiny_model().SerializeToString())
        if "masks" not in registered_passes():  # this build has no masks pass: still a refusal
            return Case("masks(sparsity=1.5) (no masks pass)", p, passes="masks(sparsity=1.5)", expect_words=("masks",))
        return Case("masks(sparsity=1.5)", p, passes="masks(sparsity=1.5)", expect_words=("sparsity",))

    def bad_pipeline(d: Path) -> Case:
        p = _write(d / "ok_pipeline.onnx", _tiny_model().SerializeToString())
        return Case("unbalanced pipeline", p, passes="cleanup(fold_constants=true", expect_words=("unbalanced",))

    return [(f.__name__, f) for f in (
        missing, directory, fifo, empty, random_bytes, truncated, tensor_proto, graph_proto, bad_utf8, cycle, undefined_input,
        duplicate_output, duplicate_init, init_is_input, ext_missing, ext_offset, ext_length, ext_escape,
        ext_absolute, ext_symlink, ext_constant_escape, ext_subgraph_missing, sparse_out_of_range, no_outputs,
        undefined_dtype, type_mismatch, unknown_op, low_opset, no_graph_nodes, unknown_pass, unknown_option, out_of_range, nan_option, sparsity_out_of_range,
        bad_pipeline,
    )]


def build_corpus(root: Path) -> list[Case]:
    """Build every case in its own subfolder of ``root`` (so leftovers are attributable)."""
    cases = []
    for key, build in _builders():
        folder = root / key
        folder.mkdir(parents=True)
        cases.append(build(folder))
    return cases


def digest(path: Path) -> str | None:
    """SHA-256 of a regular file (None when it is not one)."""
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path, before: set[str]) -> list[str]:
    """Names in ``folder`` that were not there before."""
    return sorted(set(os.listdir(folder)) - before)


@dataclass
class Outcome:
    """What one CLI run did."""

    case: Case
    code: int
    stderr: str
    left: list[str]
    input_changed: bool
    problems: list[str]


def run_case(case: Case, outdir: Path, timeout: float = 120.0) -> Outcome:
    """Run one case through the CLI in a subprocess and judge the result."""
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / "out.onnx"
    before_out = set(os.listdir(outdir))
    folder = case.input.parent
    before_in = set(os.listdir(folder))
    watched = [case.input, *case.extra_files]
    digests = [digest(p) for p in watched]
    cmd = [sys.executable, "-m", "onnxprune", "optimize", str(case.input), "--passes", case.passes, "-o", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(folder))
    problems = []
    stderr = proc.stderr.strip()
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    left = leftovers(outdir, before_out) + [f"{folder.name}/{n}" for n in leftovers(folder, before_in)]
    changed = [digest(p) for p in watched] != digests
    if proc.returncode != case.expect_exit:
        problems.append(f"exit {proc.returncode}, expected {case.expect_exit}")
    if "Traceback" in proc.stderr:
        problems.append("traceback printed")
    if case.expect_exit != 0:
        if len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"expected one 'error:' line on stderr, got {len(lines)} lines")
        if left:
            problems.append(f"left {left}")
    else:
        if not out.is_file():
            problems.append("no output written")
        left = [n for n in left if n not in ("out.onnx",)]
        if left:
            problems.append(f"left {left}")
    text = stderr.lower()
    missing = [w for w in case.expect_words if w not in text]
    if missing:
        problems.append(f"message lacks {missing}")
    if changed:
        problems.append("input changed")
    return Outcome(case, proc.returncode, stderr, left, changed, problems)


def format_table(outcomes: list[Outcome], root: Path | None = None, width: int = 110) -> str:
    """A plain-text table: input, exit code, message (paths relative to ``root``), output left, verdict."""
    rows = [("input", "exit", "message", "left", "ok")]
    for o in outcomes:
        msg = o.stderr.splitlines()[-1] if o.stderr else ""
        if root is not None:
            msg = msg.replace(str(root) + os.sep, "")
        msg = msg if len(msg) <= width else msg[: width - 3] + "..."
        rows.append((o.case.name, str(o.code), msg, ", ".join(o.left) or "none",
                     "ok" if not o.problems else "FAIL: " + "; ".join(o.problems)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
        if len(lines) == 1:
            lines.append("-" * (sum(widths) + 12))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build the corpus, run it, print the table; return 1 if any case misbehaved."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="build the corpus in this (new) folder and keep it")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onnxprune-hostile-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        corpus = root / "corpus"
        cases = build_corpus(corpus)
        outcomes = [run_case(c, root / "out" / c.input.parent.name) for c in cases]
        print(format_table(outcomes, corpus))
    bad = [o for o in outcomes if o.problems]
    print(f"\n{len(outcomes) - len(bad)}/{len(outcomes)} cases behaved")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

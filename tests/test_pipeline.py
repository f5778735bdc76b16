"""Pass infrastructure: pipeline parsing, options, registry, PassManager, recipes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import PassError, PipelineError
from onnxprune.ir.load import from_proto
from onnxprune.ir.model import Model
from onnxprune.pipeline import manager, registry
from onnxprune.pipeline.base import Pass, PassContext, PassResult
from onnxprune.pipeline.manager import PassManager
from onnxprune.pipeline.options import build_options
from onnxprune.pipeline.registry import register_pass
from onnxprune.pipeline.spec import load_recipe, parse_pipeline, parse_pipeline_spec


@dataclass
class ToyOptions:
    """Options covering every supported type and bound."""

    ratio: float = field(default=0.5, metadata={"min": 0.0, "max_exclusive": 1.0, "help": "share"})
    n: int = field(default=2, metadata={"min": 1})
    criterion: Literal["l1", "l2"] = "l2"
    mode: str = field(default="a", metadata={"choices": ("a", "b")})
    flag: bool = False
    include: str | None = None
    blocks: list[int] = field(default_factory=list)

    def validate(self) -> None:
        if self.n > 8 and self.ratio > 0.5:
            raise ValueError("n > 8 needs ratio <= 0.5")


class ToyPass(Pass):
    """Scales the weight W by 2 (really modifies) and uses a cached analysis."""

    name = "toy-scale"
    description = "multiply W by two (test pass)"
    Options = ToyOptions
    preserves = ("kept",)
    runs: list[str] = []

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ctx.get_analysis("kept", lambda: "k")
        ctx.get_analysis("dropped", lambda: "d")
        model.set_array("W", np.asarray(model.get_array("W")) * 2)
        ToyPass.runs.append(self.name)
        return PassResult(model, True, {"scaled": 1})


class BreakPass(Pass):
    """Produces an invalid model (a node reading an undefined tensor)."""

    name = "toy-break"
    description = "make the graph invalid (test pass)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        model.graph.node[0].input[0] = "undefined_tensor"
        return PassResult(model, True, {})


class CrashPass(Pass):
    """Raises a plain Python exception."""

    name = "toy-crash"
    description = "raise ZeroDivisionError (test pass)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return 1 / 0  # type: ignore[return-value]


class CheckAnalysesPass(Pass):
    """Records which analyses are cached when it runs."""

    name = "toy-look"
    description = "record cached analyses (test pass)"
    seen: list[tuple[bool, bool]] = []

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        CheckAnalysesPass.seen.append((ctx.has_analysis("kept"), ctx.has_analysis("dropped")))
        return PassResult(model, False, {})


@pytest.fixture(autouse=True)
def toy_passes() -> Iterator[None]:
    """Register the toy passes for one test, then remove them (the fuzzer must not see them)."""
    registry.registered_passes()
    classes = (ToyPass, BreakPass, CrashPass, CheckAnalysesPass)
    for cls in classes:
        register_pass(cls)
    yield
    for cls in classes:
        registry._REGISTRY.pop(cls.name, None)


def _model() -> Model:
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "W")
    m = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])], [w]),
        opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return from_proto(m)


# ---------------------------------------------------------------------- parsing
def test_parse_spec_basic_and_quotes() -> None:
    spec = "a(x=1, y='p,q(r)'),b,c(z=\"s;t\")"
    assert parse_pipeline_spec(spec) == [("a", {"x": "1", "y": "p,q(r)"}), ("b", {}), ("c", {"z": "s;t"})]


def test_parse_spec_nested_parens_in_value() -> None:
    assert parse_pipeline_spec("a(include=enc(0|1)\\.ffn)") == [("a", {"include": "enc(0|1)\\.ffn"})]


@pytest.mark.parametrize("spec, words", [
    ("", "empty"),
    ("a(x=1", "unbalanced '('"),
    ("a)x", "unbalanced ')'"),
    ("a(x='1)", "unterminated"),
    ("a,,b", "empty pass name"),
    ("a(x)", "key=value"),
    ("a(x=1,x=2)", "given twice"),
    ("a b", "cannot parse"),
])
def test_parse_spec_errors(spec: str, words: str) -> None:
    with pytest.raises(PipelineError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_pipeline_spec(spec)


def test_unknown_pass_lists_choices() -> None:
    with pytest.raises(PipelineError) as info:
        parse_pipeline("cleanup,nope")
    assert "nope" in str(info.value) and "cleanup" in str(info.value) and "toy-scale" in str(info.value)


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(PipelineError) as info:
        parse_pipeline("toy-scale(bogus=1)")
    msg = str(info.value)
    assert "bogus" in msg and "ratio" in msg and "criterion" in msg


# ---------------------------------------------------------------------- options
def test_option_coercion() -> None:
    (p,) = parse_pipeline("toy-scale(ratio=0.25,n=0x4,criterion=l1,mode=b,flag=yes,include=none,blocks=1;2)")
    o = p.options
    assert (o.ratio, o.n, o.criterion, o.mode, o.flag, o.include, o.blocks) == (0.25, 4, "l1", "b", True, None, [1, 2])
    (q,) = parse_pipeline("toy-scale(include='enc.*',n=3)")
    assert q.options.include == "enc.*" and q.options.n == 3


@pytest.mark.parametrize("spec, words", [
    ("toy-scale(ratio=1.0)", "less than 1.0"),
    ("toy-scale(ratio=-0.1)", "below the minimum"),
    ("toy-scale(ratio=abc)", "expected a number"),
    ("toy-scale(n=0)", "below the minimum 1"),
    ("toy-scale(n=2.5)", "expected an integer"),
    ("toy-scale(criterion=l3)", "not one of l1, l2"),
    ("toy-scale(mode=c)", "not one of a, b"),
    ("toy-scale(flag=maybe)", "true or false"),
    ("toy-scale(n=9,ratio=0.9)", "n > 8 needs"),
    ("toy-scale(ratio=nan)", "got NaN"),
    ("toy-scale(ratio=inf)", "less than 1.0"),
])
def test_option_errors(spec: str, words: str) -> None:
    with pytest.raises(PipelineError) as info:
        parse_pipeline(spec)
    assert words in str(info.value) and "toy-scale" in str(info.value)


def test_none_for_a_required_value_is_refused() -> None:
    """Found by fuzzing build_options: None slipped past Literal/choices checks (criterion=None)."""
    for key in ("criterion", "mode", "ratio", "n", "flag"):
        with pytest.raises(PipelineError, match=f"option {key}: needs a value"):
            build_options(ToyOptions, {key: None}, "toy-scale")
    assert build_options(ToyOptions, {"include": None}, "toy-scale").include is None


def test_build_options_typed_values_and_dash_names() -> None:
    @dataclass
    class O:
        max_fold: float = 1.0

    assert build_options(O, {"max-fold": 3}, "p").max_fold == 3.0
    with pytest.raises(PipelineError, match="expected a number"):
        build_options(O, {"max_fold": "x"}, "p")


def test_register_pass_rejects_bad_definitions() -> None:
    class BadName(Pass):
        name = "Bad_Name"
        description = "x"

    class NoDesc(Pass):
        name = "no-desc"

    class Dup(Pass):
        name = "toy-scale"
        description = "duplicate"

    for cls, words in ((BadName, "kebab-case"), (NoDesc, "description"), (Dup, "already registered")):
        with pytest.raises(ValueError, match=words):
            register_pass(cls)


def test_registry_is_sorted_and_contains_builtins() -> None:
    names = list(registry.registered_passes())
    assert names == sorted(names) and "cleanup" in names


# ---------------------------------------------------------------------- manager
def test_manager_records_stats_time_and_changes_model() -> None:
    m = _model()
    ToyPass.runs.clear()
    out, records = PassManager(parse_pipeline("toy-scale,toy-scale(ratio=0.1)")).run(m)
    np.testing.assert_array_equal(out.get_array("W"), np.arange(16).reshape(4, 4) * 4)
    assert [r.name for r in records] == ["toy-scale", "toy-scale"]
    assert records[1].options["ratio"] == 0.1
    assert all(r.modified and r.seconds >= 0 and r.stats["scaled"] == 1 for r in records)
    assert ToyPass.runs == ["toy-scale", "toy-scale"]


def test_manager_invalidates_unpreserved_analyses() -> None:
    CheckAnalysesPass.seen.clear()
    ctx = PassContext()
    PassManager(parse_pipeline("toy-scale,toy-look")).run(_model(), ctx)
    assert CheckAnalysesPass.seen == [(True, False)]
    assert ctx.has_analysis("kept") and not ctx.has_analysis("dropped")


def test_manager_stops_at_first_failure_naming_the_pass() -> None:
    ToyPass.runs.clear()
    with pytest.raises(PassError) as info:
        PassManager(parse_pipeline("toy-break,toy-scale")).run(_model())
    assert "toy-break" in str(info.value) and ToyPass.runs == []
    with pytest.raises(PassError, match="pass toy-crash failed: ZeroDivisionError"):
        PassManager(parse_pipeline("toy-crash,toy-scale")).run(_model())
    assert ToyPass.runs == []


def test_manager_progress_callback() -> None:
    calls: list[tuple[int, int, str]] = []
    PassManager(parse_pipeline("toy-look,toy-look"), progress=lambda i, n, p: calls.append((i, n, p.name))).run(_model())
    assert calls == [(0, 2, "toy-look"), (1, 2, "toy-look")]


def test_remove_dead_code_keeps_subgraph_outer_reads() -> None:
    """An initializer read only inside an If branch survives dead-code removal."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool c, float[2] x) => (float[2] y) {
        y = If(c) <then_branch = t () => (float[2] a) { a = Add(x, K) },
                   else_branch = e () => (float[2] b) { b = Identity(x) }>
        dead = Relu(x)
    }
    """
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.append(numpy_helper.from_array(np.ones(2, np.float32), "K"))
    proto.graph.initializer.append(numpy_helper.from_array(np.ones(2, np.float32), "unused"))
    m = from_proto(proto)
    assert manager.remove_dead_code(m) == 2
    assert [t.name for t in m.graph.initializer] == ["K"] and [n.op_type for n in m.graph.node] == ["If"]
    onnx.checker.check_model(m.proto)


# ---------------------------------------------------------------------- recipes
def test_recipe_with_per_layer_overrides(tmp_path: Path) -> None:
    r = tmp_path / "r.toml"
    r.write_text("""
[[pass]]
name = "toy-scale"
ratio = 0.3
criterion = "l1"
[pass.layers]
"encoder\\\\.0\\\\..*" = { ratio = 0.1 }
"classifier" = { skip = true }

[[pass]]
name = "cleanup"
""")
    passes, overrides = load_recipe(str(r))
    assert [p.name for p in passes] == ["toy-scale", "cleanup"]
    assert passes[0].options.ratio == 0.3 and passes[0].options.criterion == "l1"
    assert overrides == {"toy-scale": {"encoder\\.0\\..*": {"ratio": 0.1}, "classifier": {"skip": True}}}


@pytest.mark.parametrize("text, words", [
    ("[[pass]]\nname = 'toy-scale'\nratio = 2.0\n", "less than"),
    ("[[pass]]\nratio = 0.1\n", "no 'name'"),
    ("x = 1\n", "at least one [[pass]]"),
    ("[[pass]\nname=", "not valid TOML"),
    ("[[pass]]\nname = 'nope'\n", "unknown pass"),
])
def test_recipe_errors(tmp_path: Path, text: str, words: str) -> None:
    r = tmp_path / "r.toml"
    r.write_text(text)
    with pytest.raises(PipelineError) as info:
        load_recipe(str(r))
    assert words in str(info.value)


def test_recipe_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="not found"):
        load_recipe(str(tmp_path / "none.toml"))


# ---------------------------------------------------------------------- fuzzing the parser

_ALPHABET = "cleanupnmask(),='\\\" =;x1.5-_\t\n"


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.text(alphabet=_ALPHABET, max_size=40))
def test_parser_only_raises_pipeline_errors(text: str) -> None:
    """Any text: a parse result or a one-line PipelineError, never another exception."""
    try:
        passes = parse_pipeline(text)
    except PipelineError as exc:
        assert str(exc)
        return
    assert passes and all(isinstance(p, Pass) for p in passes)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(st.dictionaries(st.sampled_from(["ratio", "n", "criterion", "mode", "flag", "include", "blocks", "bogus"]),
                       st.one_of(st.text(max_size=6), st.integers(-3, 12), st.floats(allow_nan=True),
                                 st.booleans(), st.none()), max_size=4))
def test_build_options_only_raises_pipeline_errors(values: dict) -> None:
    """Typed values from recipes (TOML gives ints, floats, bools, strings): valid options or a PipelineError."""
    try:
        opts = build_options(ToyOptions, values, "toy-scale")
    except PipelineError as exc:
        assert "toy-scale" in str(exc)
        return
    assert 0.0 <= opts.ratio < 1.0 and opts.n >= 1 and opts.criterion in ("l1", "l2") and opts.mode in ("a", "b")


def test_result_keeps_only_the_value_info_the_input_declared() -> None:
    """Passes see every inferred shape, but the output declares only what the input declared (refreshed):
    shapes on every tensor change ONNX Runtime's fusions (SkipLayerNormalization on BERT: slower)."""
    from models.mlp import build_mlp
    from onnxprune.api import optimize

    proto = build_mlp(hidden=(64, 48))
    proto.graph.value_info.append(helper.make_tensor_value_info("fc0.relu.out", TensorProto.FLOAT, ["batch", 64]))
    res = optimize(from_proto(proto), "channels(ratio=0.5)")
    vis = {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
           for vi in res.model.graph.value_info}
    assert vis == {"fc0.relu.out": ["batch", 32]}  # declared one kept, its width refreshed; no others added
    bare = optimize(from_proto(build_mlp(hidden=(64, 48))), "channels(ratio=0.5)")
    assert len(bare.model.graph.value_info) == 0

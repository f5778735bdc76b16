"""Pass infrastructure: passes, their options, the registry, the pipeline parser and the manager.

A pass is a class with a kebab-case ``name``, a one-line ``description``, an ``Options``
dataclass and ``run(model, ctx) -> PassResult``. Options are typed dataclass fields; a field's
``metadata`` may carry ``help``, ``choices``, ``min``/``max`` (inclusive) and
``min_exclusive``/``max_exclusive`` bounds, which the pipeline parser enforces. An options class
may define ``validate(self)`` for constraints between fields (raise ``ValueError``).

Pipeline text form::

    channels(ratio=0.3,criterion=l2),nm(n=2,m=4),fp16

Values may be quoted with '...' or "..." (needed for regexes with commas or parentheses).

The :class:`PassManager` runs passes in order. After every pass that reports ``modified`` it
removes dead nodes and initializers, runs ``onnx.checker`` and strict shape inference (refreshing
``value_info``), and records the pass's statistics and wall time. It stops at the first failure
and names the pass. Analyses are cached in the :class:`PassContext` and dropped after a pass
unless the pass lists them in ``preserves``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import onnx

from onnxprune.errors import OnnxPruneError, PassError, PipelineError
from onnxprune.model import Model, _shell, node_outer_reads, node_subgraphs

log = logging.getLogger(__name__)

T = TypeVar("T")

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass
class PassResult:
    """What a pass returns.

    Attributes:
        model: The (possibly same, possibly changed) model.
        modified: True if the pass changed anything.
        stats: Counters for the report (params before/after, nnz, groups removed, ...). Values must
            be JSON-serialisable.
    """

    model: Model
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class NoOptions:
    """Options of a pass that takes none."""


class PassContext:
    """State shared by the passes of one pipeline run.

    Attributes:
        calibration: Calibration data (an object from :mod:`onnxprune.analysis.calibration`,
            or an iterable of feed dicts), or None.
        options: Free-form global options (e.g. ``{"seed": 0}``).
        recipe_overrides: Per-pass, per-layer overrides from a recipe file
            (``{pass_name: {regex: {option: value}}}``).
    """

    def __init__(
        self,
        calibration: Any = None,
        options: Mapping[str, Any] | None = None,
        recipe_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.calibration = calibration
        self.options: dict[str, Any] = dict(options or {})
        self.recipe_overrides: dict[str, Any] = dict(recipe_overrides or {})
        self._analyses: dict[str, Any] = {}
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        """Record a warning for the report (the report prints it; logged at INFO for ``-v``)."""
        log.info("warning: %s", message)
        self.warnings.append(message)

    def get_analysis(self, key: str, compute: Callable[[], T]) -> T:
        """Return the cached analysis ``key``, computing it with ``compute()`` if absent."""
        if key not in self._analyses:
            self._analyses[key] = compute()
        return self._analyses[key]

    def has_analysis(self, key: str) -> bool:
        """True if ``key`` is cached."""
        return key in self._analyses

    def invalidate(self, preserved: Iterable[str] = ()) -> None:
        """Drop every cached analysis not named in ``preserved``."""
        keep = set(preserved)
        self._analyses = {k: v for k, v in self._analyses.items() if k in keep}


class Pass:
    """Base class of all passes.

    Subclasses set ``name``, ``description``, ``Options`` and implement :meth:`run`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: Analyses (context keys) this pass leaves valid.
    preserves: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if options is None:
            options = build_options(self.Options, kwargs, self.name)
        elif kwargs:
            raise PipelineError(f"{self.name}: give either an options object or keyword options")
        self.options = options

    def run(self, model: Model, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        """Transform ``model`` and report what changed."""
        raise NotImplementedError

    def options_dict(self) -> dict[str, Any]:
        """The options as a plain dict (for reports)."""
        return dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else {}

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options_dict().items())
        return f"{self.name}({opts})"


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to the registry read by the CLI and the pipeline parser."""
    if not _NAME_RE.match(cls.name or ""):
        raise ValueError(f"pass name {cls.name!r} must be kebab-case")
    if not cls.description:
        raise ValueError(f"pass {cls.name!r} needs a one-line description")
    if not dataclasses.is_dataclass(cls.Options):
        raise ValueError(f"pass {cls.name!r}: Options must be a dataclass")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass {cls.name!r} is already registered by {_REGISTRY[cls.name].__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_passes() -> None:
    """Import ``onnxprune.passes`` (which registers the built-in passes).

    Installed, ``onnxprune.passes`` is the top-level ``passes/`` folder (setuptools
    ``package-dir``). In a plain source checkout on ``PYTHONPATH`` (e.g. on a GPU box without
    installing), the folder is loaded from beside the ``onnxprune`` package instead.
    """
    import importlib.util
    import sys
    from pathlib import Path

    if "onnxprune.passes" in sys.modules:
        return
    try:
        import onnxprune.passes  # noqa: F401
        return
    except ModuleNotFoundError as exc:
        if exc.name != "onnxprune.passes":
            raise
    folder = Path(__file__).resolve().parent.parent / "passes"
    spec = importlib.util.spec_from_file_location(
        "onnxprune.passes", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:  # pragma: no cover - broken install
        raise ModuleNotFoundError("onnxprune.passes is neither installed nor beside the package")
    module = importlib.util.module_from_spec(spec)
    sys.modules["onnxprune.passes"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("onnxprune.passes", None)
        raise


def registered_passes() -> dict[str, type[Pass]]:
    """Name -> pass class, sorted by name."""
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    """Look up a pass class by name.

    Raises:
        PipelineError: unknown name (the message lists the valid ones).
    """
    passes = registered_passes()
    if name not in passes:
        raise PipelineError(f"unknown pass {name!r}; available passes: {', '.join(passes)}")
    return passes[name]


# ---------------------------------------------------------------------- options
@dataclass(frozen=True)
class OptionSpec:
    """Description of one option, derived from a dataclass field."""

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    bounds: dict[str, float]

    @property
    def type_name(self) -> str:
        """A readable name of the option's type."""
        return _type_name(self.type)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(_type_name(a) for a in args) + (" | None" if len(args) < len(typing.get_args(tp)) else "")
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def option_specs(options_cls: type) -> list[OptionSpec]:
    """The options of an options dataclass, with types resolved."""
    hints = typing.get_type_hints(options_cls)
    specs = []
    for f in dataclasses.fields(options_cls):
        if f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        md = dict(f.metadata)
        tp = hints[f.name]
        choices = md.get("choices")
        if choices is None and typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
        bounds = {k: md[k] for k in ("min", "max", "min_exclusive", "max_exclusive") if k in md}
        specs.append(OptionSpec(f.name, tp, default, md.get("help", ""), tuple(choices) if choices else None, bounds))
    return specs


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    optional = origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and \
        type(None) in typing.get_args(tp)
    if value is None and not optional and tp is not Any:
        raise PipelineError(f"{where}: needs a value (got None)")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except PipelineError as exc:
                errors.append(str(exc))
        raise PipelineError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise PipelineError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise PipelineError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value), 0)
        except ValueError:
            raise PipelineError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        else:
            try:
                out = float(str(value))
            except ValueError:
                raise PipelineError(f"{where}: expected a number, got {value!r}") from None
        if out != out:  # NaN slips through every bound check
            raise PipelineError(f"{where}: expected a number, got NaN")
        return out
    if tp is str:
        return str(value)
    if origin in (list, tuple) or tp in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(";") if v]
        (inner,) = typing.get_args(tp)[:1] or (str,)
        return [_coerce(v, inner, where) for v in items]
    if origin in (dict,) or tp is dict:
        if isinstance(value, dict):
            return value
        raise PipelineError(f"{where}: expected a table, got {value!r}")
    return value


def _check_bounds(spec: OptionSpec, value: Any, where: str) -> None:
    if value is None:
        return
    if spec.choices is not None and value not in spec.choices:
        raise PipelineError(f"{where}: {value!r} is not one of {', '.join(map(str, spec.choices))}")
    b = spec.bounds
    if "min" in b and value < b["min"]:
        raise PipelineError(f"{where}: {value} is below the minimum {b['min']}")
    if "max" in b and value > b["max"]:
        raise PipelineError(f"{where}: {value} is above the maximum {b['max']}")
    if "min_exclusive" in b and value <= b["min_exclusive"]:
        raise PipelineError(f"{where}: {value} must be greater than {b['min_exclusive']}")
    if "max_exclusive" in b and value >= b["max_exclusive"]:
        raise PipelineError(f"{where}: {value} must be less than {b['max_exclusive']}")


def build_options(options_cls: type, values: Mapping[str, Any], pass_name: str) -> Any:
    """Build and validate an options object from raw (string or typed) values.

    Raises:
        PipelineError: unknown option (lists the valid ones), bad type, out of range, or a failed
            cross-field ``validate()``.
    """
    specs = {s.name: s for s in option_specs(options_cls)}
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        key_norm = key.replace("-", "_")
        if key_norm not in specs:
            valid = ", ".join(specs) or "none"
            raise PipelineError(f"{pass_name}: unknown option {key!r}; valid options: {valid}")
        spec = specs[key_norm]
        where = f"{pass_name}: option {key_norm}"
        value = _coerce(raw, spec.type, where)
        _check_bounds(spec, value, where)
        kwargs[key_norm] = value
    for spec in specs.values():
        if spec.default is dataclasses.MISSING and spec.name not in kwargs:
            raise PipelineError(f"{pass_name}: option {spec.name!r} is required")
    try:
        opts = options_cls(**kwargs)
        validate = getattr(opts, "validate", None)
        if callable(validate):
            validate()
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"{pass_name}: {exc}") from None
    return opts


# ---------------------------------------------------------------------- pipeline spec
def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced ')' in pipeline {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quote:
        raise PipelineError(f"unterminated quote in pipeline {text!r}")
    if depth != 0:
        raise PipelineError(f"unbalanced '(' in pipeline {text!r}")
    parts.append("".join(cur))
    return parts


def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    return v


def parse_pipeline_spec(spec: str) -> list[tuple[str, dict[str, str]]]:
    """Parse ``name(k=v,...),name`` into ``[(name, {k: v}), ...]`` (values still strings)."""
    items = []
    if not spec or not spec.strip():
        raise PipelineError("empty pipeline; give at least one pass, e.g. --passes cleanup")
    for part in _split_top(spec.strip()):
        part = part.strip()
        if not part:
            raise PipelineError(f"empty pass name in pipeline {spec!r}")
        m = re.match(r"^([A-Za-z0-9_-]+)\s*(?:\((.*)\))?$", part, re.S)
        if not m:
            raise PipelineError(f"cannot parse {part!r}; expected name or name(key=value,...)")
        name, args = m.group(1), m.group(2)
        opts: dict[str, str] = {}
        if args is not None and args.strip():
            for kv in _split_top(args):
                if "=" not in kv:
                    raise PipelineError(f"{name}: expected key=value, got {kv.strip()!r}")
                k, v = kv.split("=", 1)
                k = k.strip()
                if k in opts:
                    raise PipelineError(f"{name}: option {k!r} given twice")
                opts[k] = _unquote(v)
        items.append((name, opts))
    return items


def parse_pipeline(spec: str | Iterable[Pass] | Iterable[Mapping[str, Any]]) -> list[Pass]:
    """Turn a pipeline (text, list of passes, or recipe list of tables) into pass instances.

    Raises:
        PipelineError: unknown pass or option, bad value.
    """
    if isinstance(spec, str):
        return [get_pass(name)(**opts) for name, opts in parse_pipeline_spec(spec)]
    passes: list[Pass] = []
    for item in spec:
        if isinstance(item, Pass):
            passes.append(item)
        elif isinstance(item, Mapping):
            entry = dict(item)
            if "name" not in entry:
                raise PipelineError(f"recipe entry {entry!r} has no 'name'")
            name = entry.pop("name")
            entry.pop("layers", None)
            passes.append(get_pass(name)(**entry))
        else:
            raise PipelineError(f"cannot use {item!r} as a pass")
    return passes


def load_recipe(path: str) -> tuple[list[Pass], dict[str, Any]]:
    """Read a TOML recipe.

    Format::

        [[pass]]
        name = "masks"
        sparsity = 0.5
        [pass.layers]            # optional per-layer overrides (regex -> options)
        "encoder.0.*" = { sparsity = 0.3 }

    Returns:
        The passes and the per-pass layer overrides ``{pass_name: {regex: {opt: value}}}``.

    Raises:
        PipelineError: unreadable or malformed recipe.
    """
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise PipelineError(f"{path}: recipe file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{path}: not valid TOML: {exc}") from None
    entries = data.get("pass")
    if not isinstance(entries, list) or not entries:
        raise PipelineError(f"{path}: a recipe needs at least one [[pass]] table")
    overrides: dict[str, Any] = {}
    for e in entries:
        if isinstance(e, dict) and isinstance(e.get("layers"), dict):
            overrides.setdefault(e.get("name", ""), {}).update(e["layers"])
    return parse_pipeline(entries), overrides


# ---------------------------------------------------------------------- manager
def remove_dead_code(model: Model) -> int:
    """Remove nodes whose outputs nobody uses and initializers nobody reads.

    Returns:
        Number of nodes plus initializers removed.
    """
    graph = model.graph
    needed = {o.name for o in graph.output}
    dead_nodes = []
    for i in reversed(range(len(graph.node))):  # consumers before producers
        node = graph.node[i]
        if any(o in needed for o in node.output if o) or (not node.output and node_subgraphs(node)):
            needed.update(x for x in node.input if x)
            needed.update(node_outer_reads(node))
        else:
            dead_nodes.append(i)
    for i in dead_nodes:  # descending indices: deleting one does not shift the next
        del graph.node[i]
    removed = len(dead_nodes)
    inputs = {i.name for i in graph.input}
    dead_inits = [i for i, t in enumerate(graph.initializer) if t.name not in needed and t.name not in inputs]
    for i in reversed(dead_inits):
        model.external.pop(graph.initializer[i].name, None)
        del graph.initializer[i]
    return removed + len(dead_inits)


def verify_model(model: Model, where: str) -> None:
    """Run ``onnx.checker`` and strict shape inference; refresh ``value_info``.

    Raises:
        PassError: the model is invalid; the message names ``where`` (the pass).
    """
    from onnxprune.model import _duplicate_node_name

    dup = _duplicate_node_name(model.graph)
    if dup:
        raise PassError(f"{where}: produced an invalid model: two nodes are named {dup!r}")
    shell = _shell(model.proto)
    try:
        onnx.checker.check_model(shell)
    except onnx.checker.ValidationError as exc:
        raise PassError(f"{where}: produced an invalid model: {' '.join(str(exc).split())[:400]}") from None
    try:
        inferred = onnx.shape_inference.infer_shapes(shell, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError and friends
        raise PassError(f"{where}: shape inference fails on the result: {' '.join(str(exc).split())[:400]}") from None
    init_names = {t.name for t in model.graph.initializer}
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in init_names)


def preflight(model: Model, where: str = "the input model") -> None:
    """Strict shape inference on a pipeline's input, without changing it.

    A model that is already inconsistent (a type mismatch the checker's structural pass does not
    see) is refused up front instead of the first modifying pass being blamed for it.

    Raises:
        UnsupportedModelError: shape/type inference fails on the input.
    """
    from onnxprune.errors import UnsupportedModelError

    try:
        onnx.shape_inference.infer_shapes(_shell(model.proto), strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError and friends
        raise UnsupportedModelError(
            f"{where} fails ONNX shape/type inference before any pass ran: {' '.join(str(exc).split())[:300]} "
            "(fix the model, or skip all checks with --no-verify)"
        ) from None


@dataclass
class PassRecord:
    """One pass's entry in the report."""

    name: str
    options: dict[str, Any]
    modified: bool
    seconds: float
    stats: dict[str, Any]


class PassManager:
    """Runs passes in order with cleanup, checker, shape inference and timing after each.

    Args:
        passes: Pass instances (see :func:`parse_pipeline`).
        verify: Run the checker and shape inference after every modifying pass.
        progress: Optional callback ``(index, total, pass)`` called before each pass.
    """

    def __init__(
        self,
        passes: Iterable[Pass],
        *,
        verify: bool = True,
        progress: Callable[[int, int, Pass], None] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.verify = verify
        self.progress = progress

    def run(self, model: Model, ctx: PassContext | None = None) -> tuple[Model, list[PassRecord]]:
        """Run the pipeline on ``model`` (changed in place) and return it with per-pass records.

        Raises:
            PassError: a pass failed; the message names it. Errors a user caused inside a pass
                (:class:`OnnxPruneError`) pass through unchanged.
        """
        ctx = ctx or PassContext()
        records: list[PassRecord] = []
        for i, p in enumerate(self.passes):
            if self.progress:
                self.progress(i, len(self.passes), p)
            log.info("running pass %s", p)
            t0 = time.perf_counter()
            try:
                result = p.run(model, ctx)
            except OnnxPruneError:
                raise
            except Exception as exc:
                log.debug("pass %s failed", p.name, exc_info=True)
                raise PassError(f"pass {p.name} failed: {type(exc).__name__}: {exc}") from exc
            model = result.model
            if result.modified:
                removed = remove_dead_code(model)
                if removed:
                    result.stats.setdefault("dead_removed", removed)
                if self.verify:
                    verify_model(model, f"pass {p.name}")
                ctx.invalidate(p.preserves)
            seconds = time.perf_counter() - t0
            records.append(PassRecord(p.name, p.options_dict(), result.modified, seconds, dict(result.stats)))
            log.info("pass %s: modified=%s %.2fs %s", p.name, result.modified, seconds, result.stats)
        return model, records

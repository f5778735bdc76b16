"""Typed pass options: dataclass fields with metadata, coerced and bounds-checked from text.

Options are typed dataclass fields; a field's ``metadata`` may carry ``help``, ``choices``,
``min``/``max`` (inclusive) and ``min_exclusive``/``max_exclusive`` bounds, which
:func:`build_options` enforces. An options class may define ``validate(self)`` for constraints
between fields (raise ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from onnxprune.errors import PipelineError


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

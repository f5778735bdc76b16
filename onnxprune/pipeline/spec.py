"""The pipeline text form and TOML recipes.

Pipeline text form::

    channels(ratio=0.3,criterion=l2),nm(n=2,m=4),fp16

Values may be quoted with '...' or "..." (needed for regexes with commas or parentheses).
A recipe is a TOML file with ``[[pass]]`` tables (``name`` plus options) and optional per-layer
overrides.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from onnxprune.errors import PipelineError
from onnxprune.pipeline.base import Pass
from onnxprune.pipeline.registry import get_pass


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

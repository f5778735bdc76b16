"""Per-op-family channel handlers for the dependency graph.

A handler is ``fn(a: Analysis, node: onnx.NodeProto) -> None``: it reads the layouts of the
node's inputs from the analysis (``a.layout(name)``), records parameter slices, shape edits,
unions and blocks, and sets the layouts of the node's outputs (``a.set_layout``). Handlers are
registered per ``(domain, op_type)`` with an opset range, so behaviour that changed between
opsets lives in separate functions instead of if-chains. An op without a handler blocks every
channel space that reaches it (see :mod:`onnxprune.analysis.channels.groups`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Handler = Callable[[Any, Any], None]


@dataclass(frozen=True)
class _Entry:
    since: int
    until: int | None
    fn: Handler


_REGISTRY: dict[tuple[str, str], list[_Entry]] = {}


_LOADED = False


def register(op_types: str | Iterable[str], domain: str = "", since: int = 1,
             until: int | None = None) -> Callable[[Handler], Handler]:
    """Decorator: register a handler for ``op_types`` in ``domain`` for opsets ``[since, until]``."""
    ops = [op_types] if isinstance(op_types, str) else list(op_types)

    def deco(fn: Handler) -> Handler:
        for op in ops:
            _REGISTRY.setdefault((domain, op), []).append(_Entry(since, until, fn))
        return fn

    return deco


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def lookup(domain: str, op_type: str, opset: int) -> Handler | None:
    """The handler for ``op_type`` at ``opset`` (None if there is none)."""
    _load()
    dom = "" if domain in ("", "ai.onnx") else domain
    for e in _REGISTRY.get((dom, op_type), []):
        if e.since <= opset and (e.until is None or opset <= e.until):
            return e.fn
    return None


def handled_ops() -> list[str]:
    """Every registered op type (for documentation and tests)."""
    _load()
    return sorted({op if not d else f"{d}::{op}" for d, op in _REGISTRY})

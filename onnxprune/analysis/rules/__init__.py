"""The one per-op propagation registry, shared by the channel analysis and the head/FFN engine.

A rule says how one op carries pruning structure from its inputs to its outputs. Rules are
registered per ``(domain, op_type)`` with an opset range ``[since, until]`` and an *analysis*:

* ``"channels"`` — ``fn(a: Analysis, node) -> None`` for the channel dependency graph
  (:mod:`onnxprune.analysis.channels`): it reads the layouts of the node's inputs
  (``a.layout(name)``), records parameter slices, shape edits, unions and blocks, and sets the
  layouts of the node's outputs (``a.set_layout``);
* ``"heads"`` — ``fn(eng: Engine, node, annotated, comp) -> None`` for the head/FFN engine
  (:mod:`onnxprune.analysis.heads`): it carries the head/neuron annotations of the annotated
  inputs to the outputs (``eng.emit``) or raises ``Blocked(reason)``.

One file per op family holds both analyses' rules for its ops, so behaviour that changed between
opsets lives in separate functions instead of if-chains, and a new op is one file to edit. An op
without a rule blocks every channel space (or head block) that reaches it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Rule = Callable[..., None]
ANALYSES = ("channels", "heads")


@dataclass(frozen=True)
class _Entry:
    since: int
    until: int | None
    fn: Rule


_REGISTRY: dict[tuple[str, str, str], list[_Entry]] = {}
_LOADED = False


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def register(op_types: str | Iterable[str], domain: str = "", since: int = 1, until: int | None = None,
             analysis: str = "channels") -> Callable[[Rule], Rule]:
    """Decorator: register a rule of ``analysis`` for ``op_types`` in ``domain`` for opsets ``[since, until]``."""
    if analysis not in ANALYSES:
        raise ValueError(f"analysis must be one of {ANALYSES}, not {analysis!r}")
    ops = [op_types] if isinstance(op_types, str) else list(op_types)

    def deco(fn: Rule) -> Rule:
        for op in ops:
            _REGISTRY.setdefault((analysis, _norm_domain(domain), op), []).append(_Entry(since, until, fn))
        return fn

    return deco


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "common":
            importlib.import_module(f"{__name__}.{info.name}")


def lookup(domain: str, op_type: str, opset: int, analysis: str = "channels") -> Rule | None:
    """The rule of ``analysis`` for ``op_type`` at ``opset`` (None if there is none)."""
    _load()
    for e in _REGISTRY.get((analysis, _norm_domain(domain), op_type), []):
        if e.since <= opset and (e.until is None or opset <= e.until):
            return e.fn
    return None


def handled_ops(analysis: str = "channels") -> list[str]:
    """Every op type with a rule of ``analysis`` (for documentation and tests)."""
    _load()
    return sorted({op if not d else f"{d}::{op}" for a, d, op in _REGISTRY if a == analysis})


__all__ = ["ANALYSES", "Rule", "handled_ops", "lookup", "register"]

"""The :class:`PassManager`: run passes in order, clean up and verify after each.

After every pass that reports ``modified`` the manager removes dead nodes and initializers, runs
``onnx.checker`` and strict shape inference (refreshing ``value_info``), and records the pass's
statistics and wall time. It stops at the first failure and names the pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import onnx

from onnxprune.errors import OnnxPruneError, PassError, UnsupportedModelError
from onnxprune.ir.graph import (
    duplicate_node_name,
    make_shell,
    node_outer_reads,
    node_subgraphs,
)
from onnxprune.ir.model import Model
from onnxprune.pipeline.base import Pass, PassContext

log = logging.getLogger(__name__)


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
    dup = duplicate_node_name(model.graph)
    if dup:
        raise PassError(f"{where}: produced an invalid model: two nodes are named {dup!r}")
    shell = make_shell(model.proto)
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
    try:
        onnx.shape_inference.infer_shapes(make_shell(model.proto), strict_mode=True, data_prop=True)
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

"""The :class:`PassManager`: run passes in order, clean up and verify after each.

After every pass that reports ``modified`` the manager removes dead nodes and initializers, runs
``onnx.checker`` and strict shape inference (refreshing ``value_info``), and records the pass's
statistics and wall time. It stops at the first failure and names the pass.

**value_info.** Passes see the inferred shape of every tensor, but the result keeps ``value_info``
only for the tensors the input declared one for (with refreshed shapes): annotating every
intermediate tensor changes which fusions ONNX Runtime applies. Measured on a torch-exported
BERT-base (ORT 1.32 CPU, 2 threads): with shapes on every tensor ORT fuses ``Add`` +
``LayerNormalization`` into ``SkipLayerNormalization``, whose kernel took 78 ms per batch of 16
against 28 ms for the pair, and the cleaned model ran 6% slower than its input.

**Final verification** (``verify=True``). Before the first pass the manager loads the input in
ONNX Runtime (CPU). If it loads and its weights are under ``RUN_CHECK_BYTES`` (200 MB), it also
runs it once on the check inputs (given, or :func:`onnxprune.check.synthesize_feeds`) and keeps
each output's shape, dtype and finiteness (:class:`onnxprune.check.RunSignature`). Then:

* after every modifying pass, for models under ``RUN_CHECK_BYTES``, ONNX Runtime must load the
  result (a session without graph optimizations: cheap), so a pass that writes an unloadable
  model is named at once; bigger models are load-checked once, after the last pass, and the
  error names the modifying passes (this per-pass load check is the chosen trade-off: re-running
  the pipeline to bisect would need a second copy of a big model);
* after the last pass, the result must run on the same inputs and give the same output shapes
  and dtypes (float precision may change), with no NaN/Inf where the input's outputs had none.

An input that ONNX Runtime cannot load skips every ONNX Runtime check (the passes cannot be
blamed); an input that runs on no synthesized inputs skips the run check (a warning says so),
the load checks still apply. A failure raises :class:`PassError` (exit 2); nothing is written.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import onnx

from onnxprune.check import (
    RunSignature,
    make_session,
    run_signature,
    signature_problems,
)
from onnxprune.errors import (
    CheckError,
    OnnxPruneError,
    PassError,
    UnsupportedModelError,
)
from onnxprune.ir.graph import (
    duplicate_node_name,
    make_shell,
    node_outer_reads,
    node_subgraphs,
)
from onnxprune.ir.model import Model
from onnxprune.ir.ortops import checkable
from onnxprune.pipeline.base import Pass, PassContext

log = logging.getLogger(__name__)

#: Models with more weight bytes than this are load-checked only once and never run-checked.
RUN_CHECK_BYTES = 200 * 1024 * 1024


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
        onnx.checker.check_model(checkable(shell))  # ORT's ai.onnx SimplifiedLayerNormalization passes
    except onnx.checker.ValidationError as exc:
        raise PassError(f"{where}: produced an invalid model: {' '.join(str(exc).split())[:400]}") from None
    try:
        inferred = onnx.shape_inference.infer_shapes(shell, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError and friends
        raise PassError(f"{where}: shape inference fails on the result: {' '.join(str(exc).split())[:400]}") from None
    init_names = {t.name for t in model.graph.initializer}
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in init_names)


def keep_declared_value_info(model: Model, declared: set[str]) -> None:
    """Drop the ``value_info`` entries of tensors the input did not declare (module docstring)."""
    keep = [vi for vi in model.graph.value_info if vi.name in declared]
    if len(keep) != len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)


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
        verify: Run the checker and shape inference after every modifying pass, and the ONNX
            Runtime load and run checks (module docstring).
        progress: Optional callback ``(index, total, pass)`` called before each pass.
        check_inputs: Inputs for the final run check (dict or ``.npz``); synthesized when None.
        check_dims: Values of dynamic dims for synthesized inputs.
    """

    def __init__(
        self,
        passes: Iterable[Pass],
        *,
        verify: bool = True,
        progress: Callable[[int, int, Pass], None] | None = None,
        check_inputs: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        check_dims: Mapping[str, int] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.verify = verify
        self.progress = progress
        self.check_inputs = check_inputs
        self.check_dims = check_dims

    def run(self, model: Model, ctx: PassContext | None = None) -> tuple[Model, list[PassRecord]]:
        """Run the pipeline on ``model`` (changed in place) and return it with per-pass records.

        Raises:
            PassError: a pass failed, or its result failed verification; the message names it.
                Errors a user caused inside a pass (:class:`OnnxPruneError`) pass through unchanged.
        """
        ctx = ctx or PassContext()
        records: list[PassRecord] = []
        baseline = self._baseline(model, ctx) if self.verify and self.passes else None
        modifying: list[str] = []
        declared = {vi.name for vi in model.graph.value_info}
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
                modifying.append(p.name)
                removed = remove_dead_code(model)
                if removed:
                    result.stats.setdefault("dead_removed", removed)
                if self.verify:
                    verify_model(model, f"pass {p.name}")
                    if baseline is not None and baseline.per_pass_load:
                        ort_load_check(model, f"pass {p.name}")
                ctx.invalidate(p.preserves)
            seconds = time.perf_counter() - t0
            records.append(PassRecord(p.name, p.options_dict(), result.modified, seconds, dict(result.stats)))
            log.info("pass %s: modified=%s %.2fs %s", p.name, result.modified, seconds, brief_stats(result.stats))
        if modifying:
            keep_declared_value_info(model, declared)
        if baseline is not None and modifying:
            final_verification(model, baseline, modifying)
        return model, records

    def _baseline(self, model: Model, ctx: PassContext) -> Baseline | None:
        """What the input gives in ONNX Runtime; None when ONNX Runtime cannot load it."""
        small = model.weight_bytes() < RUN_CHECK_BYTES
        try:  # a large model is only load-checked: an optimised session would pre-pack a copy of every weight
            session = make_session(model, optimize=small)
        except CheckError as exc:
            log.warning("ONNX Runtime cannot load the input model, so the results are not load- or run-checked: %s",
                        exc)
            return None
        if not small:
            log.info("final verification: weights over %d MB, so the result is load-checked only",
                     RUN_CHECK_BYTES >> 20)
            return Baseline(None, per_pass_load=False)
        try:
            signature = run_signature(model, self.check_inputs, self.check_dims, session=session)
        except CheckError as exc:
            ctx.warn(f"final run check skipped (only the load check applies): {exc}")
            return Baseline(None, per_pass_load=True)
        return Baseline(signature, per_pass_load=True)


def brief_stats(stats: Mapping[str, Any], limit: int = 300) -> str:
    """The scalar statistics of a pass for one log line (per-weight tables and lists left out,
    at most ``limit`` characters): ``-v`` must not print multi-KB dict dumps."""
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in stats.items() if not isinstance(v, (dict, list, tuple, set)))
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class Baseline:
    """The input model's run signature (None: run check skipped) and whether to load-check every pass."""

    signature: RunSignature | None
    per_pass_load: bool


def ort_load_check(model: Model, where: str) -> None:
    """ONNX Runtime (CPU, no graph optimizations) must load ``model``.

    Raises:
        PassError: it does not; the message names ``where``.
    """
    try:
        make_session(model, optimize=False)
    except CheckError as exc:
        raise PassError(f"{where}: produced a model that {exc}") from None


def final_verification(model: Model, baseline: Baseline, modifying: list[str]) -> None:
    """The result loads and (with a signature) runs like the input (see the module docstring).

    Raises:
        PassError: naming the pass (or the modifying passes, when the load was not checked per pass).
    """
    where = (f"pass {modifying[-1]}" if baseline.per_pass_load or len(modifying) == 1
             else f"one of the passes {', '.join(modifying)} (load checked only at the end for models over "
                  f"{RUN_CHECK_BYTES >> 20} MB; run them one at a time to find which)")
    if baseline.signature is None:
        if not baseline.per_pass_load:
            ort_load_check(model, where)
        return
    after = f"pass {modifying[-1]}" if len(modifying) == 1 else f"passes {', '.join(modifying)}"
    try:
        problems = signature_problems(baseline.signature, model)
    except CheckError as exc:
        raise PassError(f"final verification failed after {after}: {exc} (skip with --no-verify)") from None
    if problems:
        raise PassError(f"final verification failed after {after}: {'; '.join(problems[:5])}"
                        + (" ..." if len(problems) > 5 else "") + " (skip with --no-verify)")

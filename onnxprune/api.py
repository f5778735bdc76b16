"""The one code path behind the CLI and the Python API: :func:`optimize`.

``optimize(model, pipeline)`` parses the pipeline, runs it through the :class:`PassManager`,
summarises the model before and after and, when asked, compares the result with the input on
ONNX Runtime CPU. The CLI calls exactly this function.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxprune.analysis.calibration import CalibrationData
from onnxprune.analysis.weights import (
    find_weights,
    is_weight_tensor,
    node_label,
    subgraph_initializers,
    weight_labels,
    weight_nodes,
)
from onnxprune.check import compare
from onnxprune.ir.graph import node_outer_reads
from onnxprune.ir.model import Model
from onnxprune.pipeline.base import Pass, PassContext
from onnxprune.pipeline.manager import PassManager, preflight
from onnxprune.pipeline.plan import calibration_unused, check_overrides, plan_pipeline
from onnxprune.pipeline.spec import parse_pipeline
from onnxprune.progress import stage
from onnxprune.report import Report
from onnxprune.summary import summarize


@dataclass
class OptimizeResult:
    """The optimised model and its report."""

    model: Model
    report: Report


def _calibration(calibration: Any, model: Model, batch_size: int | None, limit: int | None = None) -> Any:
    if calibration is None:
        return None
    data = CalibrationData.from_any(calibration, model, batch_size=batch_size)
    return data.head(limit) if limit is not None else data


def subgraph_weights(model: Model) -> list[str]:
    """Floating-point weights (more than one element) that If/Loop/Scan bodies use: main-graph
    initializers read from inside a body, and initializers stored in a body. Sorted, deduplicated."""
    main = model.initializer_map()
    names = set(subgraph_initializers(model))
    for node in model.graph.node:
        names.update(n for n in node_outer_reads(node) if n in main and is_weight_tensor(main[n]))
    return sorted(names)


def annotate_rows(rows: list[dict[str, Any]], model: Model) -> None:
    """Add to each per-initializer row (``summarize(..., per_initializer=True)``), in place, what a
    reader needs to recognise it: ``node`` (the consuming node's name, :func:`weight_nodes`),
    ``order`` (that node's index in graph order, None if no node reads it) and ``weight`` (True for
    a Conv / ConvTranspose / MatMul / Gemm weight, the layers passes prune)."""
    nodes = weight_nodes(model)
    index = {node_label(n, i): i for i, n in enumerate(model.graph.node)}
    weights = {w.name for w in find_weights(model)}
    for r in rows:
        r["node"] = nodes.get(r["name"])
        r["order"] = index.get(r["node"]) if r["node"] else None
        r["weight"] = r["name"] in weights


def optimize(
    model: Model,
    pipeline: str | Iterable[Pass] | Iterable[Mapping[str, Any]],
    *,
    calibration: str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]] | Any = None,
    calibration_batch: int | None = None,
    calibration_limit: int | None = None,
    check: bool = False,
    check_inputs: Mapping[str, np.ndarray] | str | os.PathLike[str] | None = None,
    check_dims: Mapping[str, int] | None = None,
    check_pool: str | None = None,
    recipe_overrides: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    inplace: bool = False,
    verify: bool = True,
    input_path: str | os.PathLike[str] | None = None,
    per_layer: bool = False,
) -> OptimizeResult:
    """Run a pipeline of passes on ``model``.

    Args:
        model: The model (from :func:`onnxprune.load`). Left unchanged unless ``inplace``.
        pipeline: Pipeline text (``"channels(ratio=0.3),nm(n=2,m=4)"``), pass instances, or
            recipe tables.
        calibration: An ``.npz`` path, an iterable of feed dicts, or a ``CalibrationData``.
        calibration_batch: Batch size when slicing an ``.npz`` into batches.
        calibration_limit: Use only the first this many calibration samples (what the automatic
            search's reproducing command passes, so the held-out samples stay unseen).
        check: Compare the result with the input on ONNX Runtime CPU.
        check_inputs: Inputs for the check (dict or ``.npz``); random when None.
        check_dims: Values of dynamic dimensions for random check inputs.
        check_pool: ``"mean"``: the check also reports the mean-pooled cosine of ``[B, S, H]``
            outputs (sentence embeddings), which :func:`onnxprune.check.verdict` then gates.
        recipe_overrides: Per-layer overrides ``{pass: {regex: {option: value}}}``.
        options: Global options for the context (e.g. ``{"seed": 0}``).
        inplace: Change ``model`` itself instead of a copy (saves memory on big models).
        verify: Run strict shape inference on the input first (refusing an inconsistent model up
            front), and the checker and shape inference after every modifying pass.
        input_path: Path to report as the input (defaults to ``model.path``).
        per_layer: Put per-initializer rows (shape, size, non-zeros, consuming node, graph order)
            into the before/after summaries (JSON reports, the HTML report's per-layer chart).

    Returns:
        The optimised model and its report.

    Raises:
        OnnxPruneError: bad pipeline, bad calibration data, a pass that failed, a failed check.
    """
    t_start = time.perf_counter()
    passes, plan_notes = plan_pipeline(parse_pipeline(pipeline))
    check_overrides(passes, recipe_overrides or {})
    if verify:
        preflight(model, str(input_path or model.path or "the input model"))
    before = summarize(model, input_path or model.path, per_initializer=per_layer)
    if per_layer:
        annotate_rows(before.per_initializer, model)
    work = model if inplace else model.copy()
    ctx = PassContext(
        calibration=_calibration(calibration, model, calibration_batch, calibration_limit),
        options={**(options or {}), **({} if verify else {"verify": False})},  # --no-verify also skips twin checks
        recipe_overrides=recipe_overrides,
    )
    reference: Model | str | os.PathLike[str] | None = None
    if check:
        if not inplace:
            reference = model
        elif model.path is not None:
            reference = model.path  # the input file is never changed
        else:
            reference = model.copy()
    out, records = PassManager(passes, verify=verify, check_inputs=check_inputs, check_dims=check_dims,
                               progress=lambda i, n, p: stage(f"pass {i + 1}/{n}: {p.name}")).run(work, ctx)
    after = summarize(out, per_initializer=per_layer)
    if per_layer:
        annotate_rows(after.per_initializer, out)
    report = Report(before=before, after=after, passes=records,
                    input_path=str(input_path or model.path) if (input_path or model.path) else None)
    if before.nonfinite_weights:
        names = before.nonfinite_weights
        report.warnings.append(
            f"the input has NaN or Inf in {len(names)} weight(s), which pruning criteria rank unpredictably: "
            f"{', '.join(weight_labels(model, names[:8]).values())}{' ...' if len(names) > 8 else ''}")
    report.warnings.extend(plan_notes)
    report.warnings.extend(ctx.warnings)
    unused = calibration_unused(passes, calibration is not None, ctx.calibration_read)
    if unused:
        report.warnings.append(unused)
    if any(p.name != "cleanup" for p in passes):
        inner = subgraph_weights(out)
        if inner:
            report.warnings.append(
                f"{len(inner)} weight(s) used inside If/Loop/Scan bodies were not pruned (subgraphs are not "
                f"handled): {', '.join(weight_labels(out, inner[:8]).values())}{' ...' if len(inner) > 8 else ''}")
    if reference is not None:
        stage("check: running both models on ONNX Runtime CPU")
        report.check = compare(reference, out, feeds=check_inputs, dims=check_dims, pool=check_pool)
    report.wall_seconds = time.perf_counter() - t_start
    return OptimizeResult(out, report)

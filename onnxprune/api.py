"""The one code path behind the CLI and the Python API: :func:`optimize`.

``optimize(model, pipeline)`` parses the pipeline, runs it through the :class:`PassManager`,
summarises the model before and after and, when asked, compares the result with the input on
ONNX Runtime CPU. The CLI calls exactly this function.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxprune.analysis.calibration import CalibrationData
from onnxprune.analysis.weights import is_weight_tensor, subgraph_initializers
from onnxprune.check import compare
from onnxprune.ir.graph import node_outer_reads
from onnxprune.ir.model import Model
from onnxprune.pipeline.base import Pass, PassContext
from onnxprune.pipeline.manager import PassManager, preflight
from onnxprune.pipeline.spec import parse_pipeline
from onnxprune.report import Report
from onnxprune.summary import summarize


@dataclass
class OptimizeResult:
    """The optimised model and its report."""

    model: Model
    report: Report


def _calibration(calibration: Any, model: Model, batch_size: int | None) -> Any:
    if calibration is None:
        return None
    if isinstance(calibration, CalibrationData):
        return calibration
    return CalibrationData.from_any(calibration, model, batch_size=batch_size)


def subgraph_weights(model: Model) -> list[str]:
    """Floating-point weights (more than one element) that If/Loop/Scan bodies use: main-graph
    initializers read from inside a body, and initializers stored in a body. Sorted, deduplicated."""
    main = model.initializer_map()
    names = set(subgraph_initializers(model))
    for node in model.graph.node:
        names.update(n for n in node_outer_reads(node) if n in main and is_weight_tensor(main[n]))
    return sorted(names)


def optimize(
    model: Model,
    pipeline: str | Iterable[Pass] | Iterable[Mapping[str, Any]],
    *,
    calibration: str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]] | Any = None,
    calibration_batch: int | None = None,
    check: bool = False,
    check_inputs: Mapping[str, np.ndarray] | str | os.PathLike[str] | None = None,
    check_dims: Mapping[str, int] | None = None,
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
        check: Compare the result with the input on ONNX Runtime CPU.
        check_inputs: Inputs for the check (dict or ``.npz``); random when None.
        check_dims: Values of dynamic dimensions for random check inputs.
        recipe_overrides: Per-layer overrides ``{pass: {regex: {option: value}}}``.
        options: Global options for the context (e.g. ``{"seed": 0}``).
        inplace: Change ``model`` itself instead of a copy (saves memory on big models).
        verify: Run strict shape inference on the input first (refusing an inconsistent model up
            front), and the checker and shape inference after every modifying pass.
        input_path: Path to report as the input (defaults to ``model.path``).
        per_layer: Put per-initializer rows (shape, size, non-zeros) into the before/after
            summaries (for the HTML report's per-layer chart).

    Returns:
        The optimised model and its report.

    Raises:
        OnnxPruneError: bad pipeline, bad calibration data, a pass that failed, a failed check.
    """
    passes = parse_pipeline(pipeline)
    if verify:
        preflight(model, str(input_path or model.path or "the input model"))
    before = summarize(model, input_path or model.path, per_initializer=per_layer)
    work = model if inplace else model.copy()
    ctx = PassContext(
        calibration=_calibration(calibration, model, calibration_batch),
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
    out, records = PassManager(passes, verify=verify, check_inputs=check_inputs, check_dims=check_dims).run(work, ctx)
    after = summarize(out, per_initializer=per_layer)
    report = Report(before=before, after=after, passes=records,
                    input_path=str(input_path or model.path) if (input_path or model.path) else None)
    if before.nonfinite_weights:
        names = before.nonfinite_weights
        report.warnings.append(
            f"the input has NaN or Inf in {len(names)} weight(s), which pruning criteria rank unpredictably: "
            f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    report.warnings.extend(ctx.warnings)
    if any(p.name != "cleanup" for p in passes):
        inner = subgraph_weights(out)
        if inner:
            report.warnings.append(
                f"{len(inner)} weight(s) used inside If/Loop/Scan bodies were not pruned (subgraphs are not "
                f"handled): {', '.join(inner[:8])}{' ...' if len(inner) > 8 else ''}")
    if reference is not None:
        report.check = compare(reference, out, feeds=check_inputs, dims=check_dims)
    return OptimizeResult(out, report)

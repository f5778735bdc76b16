"""Planning a pipeline before it runs: what one pass must know about the others.

:func:`plan_pipeline` runs once, before the first pass, on the parsed passes:

* **N:M after structural removal.** N:M masks need ``K % M == 0`` along every weight's reduction
  axis; a structural pass (``channels``, ``ffn``: any pass with a ``round_to`` option) that runs
  before an ``nm(m=M)`` sets the K of the next layers to its kept widths. Each such pass gets
  ``round_to = lcm(round_to, M)`` (over every later N:M pass's ``M``), so every kept width is a
  multiple of ``M`` and the N:M pass can mask every pruned weight (MiniLM's FFN at ratio 0.3
  keeps 1076 instead of 1075 neurons). Rounding goes up, never below the requested keep
  (:func:`onnxprune.criteria.structured.kept_width`). The pass is replaced by a copy with the new
  option (the caller's pass objects are not changed) and a note says so.
* **Per-layer overrides** (a recipe's ``[pass.layers]``) must name a pass of the pipeline that
  takes them (``Pass.layer_overrides``); otherwise they would be silently ignored. Whether each
  pattern matches a weight is checked by the pass that applies it (it knows the names).

:func:`calibration_unused` says, after the run, that calibration data was given but no pass read
it (``PassContext.calibration_read``), naming the criteria that would.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from onnxprune.errors import PipelineError
from onnxprune.pipeline.base import Pass
from onnxprune.pipeline.registry import registered_passes

__all__ = ["calibration_unused", "check_overrides", "plan_pipeline"]

#: What to say for each pass about the options that read calibration data.
CALIBRATION_READERS = ("masks/nm criterion=wanda|sparsegpt or allocation=owl; channels criterion=activation; "
                       "heads/ffn criterion=activation|weighted|reconstruction, compensate or reconstruct")


def _nm_after(passes: list[Pass], i: int) -> list[int]:
    return [int(p.options.m) for p in passes[i + 1:] if p.name == "nm" and hasattr(p.options, "m")]


def plan_pipeline(passes: list[Pass]) -> tuple[list[Pass], list[str]]:
    """Align structural passes with a later N:M pass (module docstring).

    Returns:
        The passes to run (copies where an option changed) and notes for the report.
    """
    out: list[Pass] = []
    notes: list[str] = []
    for i, p in enumerate(passes):
        ms = _nm_after(passes, i)
        round_to = getattr(p.options, "round_to", None)
        if ms and isinstance(round_to, int) and dataclasses.is_dataclass(p.options):
            want = math.lcm(round_to, *ms)
            if want != round_to:
                p = type(p)(dataclasses.replace(p.options, round_to=want))
                notes.append(f"{p.name}: kept widths rounded up to multiples of {want} (round_to={round_to} -> "
                             f"{want}) so that the following nm(m={'/'.join(map(str, sorted(set(ms))))}) can mask "
                             "every weight they feed (N:M needs K % M == 0)")
        out.append(p)
    return out, notes


def check_overrides(passes: list[Pass], overrides: Mapping[str, Any]) -> None:
    """Refuse per-layer overrides for a pass that is not in the pipeline or does not take them.

    Raises:
        PipelineError: naming the pass and the passes that do take overrides.
    """
    if not overrides:
        return
    by_name = {p.name: p for p in passes}
    takers = sorted(name for name, cls in registered_passes().items() if cls.layer_overrides)
    for name, table in overrides.items():
        if not table:
            continue
        where = f"[pass.layers] of pass {name!r}"
        if name not in by_name:
            raise PipelineError(f"{where}: no such pass in the pipeline")
        if not by_name[name].layer_overrides:
            raise PipelineError(f"{where}: {name} does not take per-layer overrides (passes that do: "
                                f"{', '.join(takers) or 'none'}; see `onnxprune passes`)")


def calibration_unused(passes: list[Pass], given: bool, read: bool) -> str | None:
    """The warning for calibration data that no pass read, or None."""
    if not given or read:
        return None
    crit = [f"{p.name} criterion={p.options.criterion}" for p in passes if hasattr(p.options, "criterion")]
    used = f" ({', '.join(crit)})" if crit else ""
    return (f"calibration data was given but no pass read it: the pipeline's criteria{used} do not use it. "
            f"Options that do: {CALIBRATION_READERS}")

"""The optimisation report: what each pass did, what it cost and bought.

A :class:`Report` holds the model summaries before and after, one record per pass (name,
options, stats, seconds, modified), the check result when one ran, and why the run failed when it did. It prints as terminal
tables and serialises to JSON (``--report report.json`` / ``--json``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from onnxprune.check import CheckResult
from onnxprune.fmt import fmt_bytes, fmt_int, short_value
from onnxprune.pipeline.manager import PassRecord
from onnxprune.summary import ModelSummary


def subgraph_rows(b: ModelSummary, a: ModelSummary) -> list[tuple[str, str, str]]:
    """Rows for what If/Loop/Scan bodies hold, when either model has any (included in the totals above)."""
    if not (b.subgraph_nodes or a.subgraph_nodes):
        return []
    return [("  nodes in If/Loop bodies", fmt_int(b.subgraph_nodes), fmt_int(a.subgraph_nodes)),
            ("  parameters in bodies", fmt_int(b.in_subgraphs), fmt_int(a.in_subgraphs))]


@dataclass
class Report:
    """Everything the CLI prints and writes as JSON."""

    before: ModelSummary
    after: ModelSummary
    passes: list[PassRecord] = field(default_factory=list)
    input_path: str | None = None
    output_path: str | None = None
    check: CheckResult | None = None
    warnings: list[str] = field(default_factory=list)
    #: Why the run failed (a check problem, a tolerance or gate exceeded); the output was then not
    #: written. Empty for a successful run.
    failures: list[str] = field(default_factory=list)
    #: Wall time of the whole run (summaries, passes, verification between them, the check), or
    #: None when unknown; :attr:`total_seconds` is the passes' share of it.
    wall_seconds: float | None = None

    @property
    def total_seconds(self) -> float:
        """Time spent in passes."""
        return sum(p.seconds for p in self.passes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "input": {"path": self.input_path, "size": self.before.file_size},
            "output": {"path": self.output_path, "size": self.after.file_size},
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "passes": [asdict(p) for p in self.passes],
            "total_seconds": round(self.total_seconds, 4),
            "wall_seconds": None if self.wall_seconds is None else round(self.wall_seconds, 4),
            "check": self.check.to_dict() if self.check else None,
            "warnings": list(self.warnings),
            "failed": bool(self.failures),
            "failures": list(self.failures),
        }

    def to_json(self, indent: int = 2) -> str:
        """The report as JSON text."""
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def format(self) -> str:
        """Terminal tables: before/after, passes, and the check."""
        b, a = self.before, self.after
        ops = sorted(set(b.ops) | set(a.ops))
        changed_ops = [o for o in ops if b.ops.get(o, 0) != a.ops.get(o, 0)]
        rows = [
            ("nodes", fmt_int(b.nodes), fmt_int(a.nodes)),
            ("parameters", fmt_int(b.parameters), fmt_int(a.parameters)),
            ("non-zero parameters", fmt_int(b.nonzero), fmt_int(a.nonzero)),
            ("sparsity", f"{b.sparsity:.2%}", f"{a.sparsity:.2%}"),
            ("weight bytes", fmt_bytes(b.weight_bytes), fmt_bytes(a.weight_bytes)),
            ("file size", fmt_bytes(b.file_size), fmt_bytes(a.file_size)),
        ] + subgraph_rows(b, a) + [(f"  op {o}", str(b.ops.get(o, 0)), str(a.ops.get(o, 0))) for o in changed_ops]
        w = max(len(r[0]) for r in rows)
        lines = [f"{'':<{w}}  {'before':>16}  {'after':>16}", "-" * (w + 36)]
        lines += [f"{r[0]:<{w}}  {r[1]:>16}  {r[2]:>16}" for r in rows]
        if self.passes:
            lines += ["", f"{'pass':<14} {'changed':>7} {'seconds':>8}  stats", "-" * 72]
            for p in self.passes:
                stats = ", ".join(f"{k}={short_value(v)}" for k, v in p.stats.items() if not isinstance(v, (list, dict)))
                lines.append(f"{p.name:<14} {('yes' if p.modified else 'no'):>7} {p.seconds:>8.2f}  {stats}")
            lines.append(f"{'all passes':<14} {'':>7} {self.total_seconds:>8.2f}"
                         + (f"  whole run {self.wall_seconds:.2f} s (with summaries, verification and the check)"
                            if self.wall_seconds is not None else ""))
        if self.check:
            lines += ["", "check against the input model (ONNX Runtime CPU):", self.check.format()]
        for wmsg in self.warnings:
            lines.append(f"warning: {wmsg}")
        for fmsg in self.failures:
            lines.append(f"failed: {fmsg}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


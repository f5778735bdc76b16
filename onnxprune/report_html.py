"""Render a :class:`~onnxprune.report.Report` as one self-contained HTML page.

The page has no scripts and no external resources (inline CSS and SVG only), so it can be
attached to a CI run or mailed. It holds:

* a summary table (nodes, parameters, non-zeros, sparsity, weight bytes, file size) before/after;
* a per-layer chart: for every floating-point initializer with more than one element (only the
  changed ones when there are more than :data:`MAX_CHART_ROWS`), one row
  with two bars —
  *kept* = ``size_after / size_before`` (structured removal shrinks it; a removed initializer
  reads 0) and *density* = ``nonzero / size`` before (grey) and after (blue), so unstructured and
  N:M masks show as a shorter blue bar; the exact shapes and counts are in each row's tooltip and
  in the table below the chart;
* the pass table (name, options, changed, seconds, statistics);
* the check results (max/mean abs and rel error, cosine, top-1 per output) and warnings.

Layer rows come from ``Report.before.per_initializer`` / ``Report.after.per_initializer``
(``summary.summarize(..., per_initializer=True)``); without them the chart says so instead of
drawing nothing.
"""

from __future__ import annotations

import html
import json
from typing import Any

from onnxprune.fmt import fmt_bytes, fmt_int
from onnxprune.report import Report

ROW_H = 16
LABEL_W = 300
BAR_W = 260
GAP = 60
#: Above this many weights the chart shows only the changed ones (the table still lists all).
MAX_CHART_ROWS = 400

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px;color:#1d2330;max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
.sub{color:#5a6275;font-size:13px;margin-bottom:16px;word-break:break-all}
table{border-collapse:collapse;font-size:13px} th,td{padding:3px 10px;border-bottom:1px solid #eceef3;text-align:left}
th{background:#f4f6fa;font-weight:600} td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{background:#f4f6fa;border-radius:8px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:20px} .card span{color:#5a6275;font-size:12px}
.warn{background:#fff6e0;border-left:4px solid #e0a100;padding:6px 10px;margin:4px 0;font-size:13px}
.ok{color:#17803d} .bad{color:#b42318} code{font-size:12px}
svg text{font-family:system-ui,sans-serif;font-size:11px;fill:#1d2330}
details{margin-top:10px} summary{cursor:pointer;color:#36c}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(x: float) -> str:
    return f"{x:.1%}"


def layer_rows(report: Report) -> list[dict[str, Any]]:
    """Join the before/after per-initializer rows by name (before's order, then new ones).

    Returns:
        One dict per initializer with ``name``, ``shape_before``/``shape_after``,
        ``size_before``/``size_after``, ``density_before``/``density_after`` and ``kept``.
    """
    before = {r["name"]: r for r in report.before.per_initializer}
    after = {r["name"]: r for r in report.after.per_initializer}
    names = [n for n in before] + [n for n in after if n not in before]
    rows = []
    for name in names:
        b, a = before.get(name), after.get(name)
        ref = b or a
        if ref is None or ref["size"] <= 1:
            continue
        sb = b["size"] if b else 0
        sa = a["size"] if a else 0
        rows.append({
            "name": name,
            "shape_before": b["shape"] if b else None,
            "shape_after": a["shape"] if a else None,
            "size_before": sb,
            "size_after": sa,
            "density_before": (b["nonzero"] / sb) if b and sb else 0.0,
            "density_after": (a["nonzero"] / sa) if a and sa else 0.0,
            "kept": (sa / sb) if sb else 1.0,
        })
    return rows


def _layer_chart(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>No per-layer data in this report (it was made without per-initializer rows).</p>"
    top = 34
    height = top + ROW_H * len(rows) + 8
    width = LABEL_W + 2 * BAR_W + GAP + 70
    x1 = LABEL_W
    x2 = LABEL_W + BAR_W + GAP
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="per-layer chart">']
    parts.append(f'<text x="{x1}" y="12" font-weight="600">parameters kept (after / before)</text>')
    parts.append(f'<text x="{x2}" y="12" font-weight="600">density: non-zero share</text>')
    parts.append(f'<rect x="{x2}" y="18" width="10" height="8" fill="#b8bfcc"/>'
                 f'<text x="{x2 + 14}" y="26">before</text>'
                 f'<rect x="{x2 + 64}" y="18" width="10" height="8" fill="#2f6fde"/>'
                 f'<text x="{x2 + 78}" y="26">after</text>')
    for frac in (0.0, 0.5, 1.0):
        for x0 in (x1, x2):
            x = x0 + frac * BAR_W
            parts.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 4}" '
                         'stroke="#e3e6ed" stroke-width="1"/>')
    for i, r in enumerate(rows):
        y = top + i * ROW_H
        label = r["name"] if len(r["name"]) <= 44 else "…" + r["name"][-43:]
        tip = (f'{r["name"]}: shape {r["shape_before"]} → {r["shape_after"]}, size {r["size_before"]:,} → '
               f'{r["size_after"]:,}, density {_pct(r["density_before"])} → {_pct(r["density_after"])}')
        kept_col = "#2f6fde" if r["kept"] >= 0.999 else "#e07a10"
        parts.append(f'<g><title>{_e(tip)}</title>')
        if i % 2:
            parts.append(f'<rect x="0" y="{y}" width="{width}" height="{ROW_H}" fill="#fafbfd"/>')
        parts.append(f'<text x="{LABEL_W - 8}" y="{y + 12}" text-anchor="end">{_e(label)}</text>')
        parts.append(f'<rect x="{x1}" y="{y + 3}" width="{BAR_W}" height="{ROW_H - 6}" fill="#eef0f4"/>')
        parts.append(f'<rect x="{x1}" y="{y + 3}" width="{BAR_W * min(r["kept"], 1.0):.1f}" '
                     f'height="{ROW_H - 6}" fill="{kept_col}"/>')
        parts.append(f'<text x="{x1 + BAR_W + 4}" y="{y + 12}">{_pct(r["kept"])}</text>')
        parts.append(f'<rect x="{x2}" y="{y + 2}" width="{BAR_W * r["density_before"]:.1f}" height="5" '
                     'fill="#b8bfcc"/>')
        parts.append(f'<rect x="{x2}" y="{y + 8}" width="{BAR_W * r["density_after"]:.1f}" height="5" '
                     'fill="#2f6fde"/>')
        parts.append(f'<text x="{x2 + BAR_W + 4}" y="{y + 12}">{_pct(r["density_after"])}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _layer_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    body = "".join(
        f'<tr><td><code>{_e(r["name"])}</code></td><td>{_e(r["shape_before"])}</td><td>{_e(r["shape_after"])}</td>'
        f'<td class="n">{r["size_before"]:,}</td><td class="n">{r["size_after"]:,}</td>'
        f'<td class="n">{_pct(1 - r["density_before"])}</td><td class="n">{_pct(1 - r["density_after"])}</td></tr>'
        for r in rows)
    return ("<details><summary>per-layer table</summary><table><tr><th>initializer</th><th>shape before</th>"
            "<th>shape after</th><th>size before</th><th>size after</th><th>sparsity before</th>"
            f"<th>sparsity after</th></tr>{body}</table></details>")


def _summary(report: Report) -> str:
    b, a = report.before, report.after
    cards = [
        ("parameters", f"{fmt_int(a.parameters)}", f"from {fmt_int(b.parameters)}"
         + (f" ({a.parameters / b.parameters:.1%})" if b.parameters else "")),
        ("sparsity", _pct(a.sparsity), f"from {_pct(b.sparsity)}"),
        ("file size", fmt_bytes(a.file_size), f"from {fmt_bytes(b.file_size)}"),
        ("time in passes", f"{report.total_seconds:.2f} s", f"{len(report.passes)} pass(es)"),
    ]
    html_cards = "".join(f'<div class="card"><span>{_e(k)}</span><b>{_e(v)}</b><span>{_e(s)}</span></div>'
                         for k, v, s in cards)
    ops = sorted(set(b.ops) | set(a.ops))
    rows = [("nodes", fmt_int(b.nodes), fmt_int(a.nodes)),
            ("parameters", fmt_int(b.parameters), fmt_int(a.parameters)),
            ("non-zero parameters", fmt_int(b.nonzero), fmt_int(a.nonzero)),
            ("sparsity", _pct(b.sparsity), _pct(a.sparsity)),
            ("weight bytes", fmt_bytes(b.weight_bytes), fmt_bytes(a.weight_bytes)),
            ("file size", fmt_bytes(b.file_size), fmt_bytes(a.file_size))]
    rows += [(f"op {o}", str(b.ops.get(o, 0)), str(a.ops.get(o, 0))) for o in ops
             if b.ops.get(o, 0) != a.ops.get(o, 0)]
    table = "".join(f'<tr><td>{_e(k)}</td><td class="n">{_e(x)}</td><td class="n">{_e(y)}</td></tr>'
                    for k, x, y in rows)
    return (f'<div class="cards">{html_cards}</div><table><tr><th></th><th>before</th><th>after</th></tr>'
            f"{table}</table>")


def _passes(report: Report) -> str:
    if not report.passes:
        return "<p>No passes ran.</p>"
    body = []
    for p in report.passes:
        opts = ", ".join(f"{k}={v}" for k, v in p.options.items())
        stats = ", ".join(f"{k}={_short(v)}" for k, v in p.stats.items())
        body.append(f'<tr><td><b>{_e(p.name)}</b></td><td><code>{_e(opts)}</code></td>'
                    f'<td>{"yes" if p.modified else "no"}</td><td class="n">{p.seconds:.3f}</td>'
                    f"<td><code>{_e(stats)}</code></td></tr>")
    return ("<table><tr><th>pass</th><th>options</th><th>changed</th><th>seconds</th><th>statistics</th></tr>"
            + "".join(body) + "</table>")


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        text = json.dumps(v, default=str)
        return text if len(text) <= 120 else text[:117] + "..."
    return str(v)


def _check(report: Report) -> str:
    c = report.check
    if c is None:
        return "<p>No check ran (use <code>--check</code>).</p>"
    inputs = ", ".join(f"{k} {v}" for k, v in c.inputs.items())
    body = []
    for o in c.outputs:
        cls = "ok" if o.shape_a == o.shape_b and o.cosine > 0.999 else "bad"
        top1 = "-" if o.top1 is None else f"{o.top1:.4f}"
        body.append(f'<tr><td><code>{_e(o.name)}</code></td><td>{_e(o.shape_a)}</td><td>{_e(o.shape_b)}</td>'
                    f'<td class="n">{o.max_abs:.3g}</td><td class="n">{o.mean_abs:.3g}</td>'
                    f'<td class="n">{o.max_rel:.3g}</td><td class="n {cls}">{o.cosine:.6f}</td>'
                    f'<td class="n">{top1}</td></tr>')
    return (f'<p class="sub">ONNX Runtime CPU, inputs: {_e(inputs)}</p><table><tr><th>output</th><th>shape ref</th>'
            "<th>shape new</th><th>max abs</th><th>mean abs</th><th>max rel</th><th>cosine</th><th>top-1</th></tr>"
            + "".join(body) + "</table>")


def render_html(report: Report, title: str = "onnxprune report") -> str:
    """The report as a self-contained HTML document (no scripts, no external resources)."""
    rows = layer_rows(report)
    changed_rows = [r for r in rows if r["kept"] < 0.999 or abs(r["density_after"] - r["density_before"]) > 1e-9]
    changed = len(changed_rows)
    chart_rows, note = rows, ""
    if len(rows) > MAX_CHART_ROWS:  # a very deep model: chart what changed, the table keeps everything
        chart_rows = changed_rows[:MAX_CHART_ROWS]
        note = (f"<p class=\"sub\">{len(rows)} weights: the chart shows the {len(chart_rows)} that changed"
                + (f" (first {MAX_CHART_ROWS})" if changed > MAX_CHART_ROWS else "") + "; the table lists all.</p>")
    warnings = "".join(f'<div class="warn">{_e(w)}</div>' for w in report.warnings)
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1>"
        f'<div class="sub">{_e(report.input_path or "(in memory)")} → {_e(report.output_path or "(not saved)")}</div>'
        f"{_summary(report)}"
        f"<h2>Per layer ({len(rows)} weights, {changed} changed)</h2>{note}{_layer_chart(chart_rows)}"
        f"{_layer_table(rows)}"
        f"<h2>Passes</h2>{_passes(report)}"
        f"<h2>Check</h2>{_check(report)}"
        + (f"<h2>Warnings</h2>{warnings}" if warnings else "")
        + "</body></html>\n"
    )


__all__ = ["layer_rows", "render_html"]

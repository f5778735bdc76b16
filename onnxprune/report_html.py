"""Render a :class:`~onnxprune.report.Report` as one self-contained HTML page.

The page has no scripts and no external resources (inline CSS and SVG only), so it can be
attached to a CI run or mailed. It holds:

* cards that say what was *kept* and *removed* (parameters, non-zero parameters, file size) and
  the time: the whole run (summaries, passes, verification, the check) beside the passes' share;
* a before/after table (nodes, parameters, non-zeros, sparsity, weight bytes, file size, changed
  op counts);
* a per-layer chart of the *prunable layers* (Conv / ConvTranspose / MatMul / Gemm weights),
  labelled by the consuming node's name (``/encoder/layer.3/intermediate/dense/MatMul``, not
  ``onnx::MatMul_922``) and grouped by block (:func:`block_of`); blocks in graph order, and in each
  block the changed layers first (highlighted), then the unchanged ones, each in graph order. Two
  bars per layer: *kept* = ``size_after / size_before`` (structured removal shrinks it; a removed
  weight reads 0) and *density* = ``nonzero / size`` before (grey) and after (blue), so
  unstructured and N:M masks show as a shorter blue bar. Biases, norms and embeddings are counted
  below the chart and listed, with everything else, in the per-layer table;
* one table per pass (options, changed, seconds, and its statistics as key / value rows; nested
  per-weight statistics as their own small table);
* the check results (max/mean abs and rel error, cosine, top-1 per output), why the run failed
  when it did, and the warnings.

Layer rows come from ``Report.before.per_initializer`` / ``Report.after.per_initializer``
(``summary.summarize(..., per_initializer=True)`` plus :func:`onnxprune.api.annotate_rows`, which
adds ``node``, ``order`` and ``weight``); without them the chart says so instead of drawing
nothing, and rows without ``node`` fall back to the initializer name in file order.

Block rule (:func:`block_of`): split the node name on ``/`` (or on ``.`` when it has no ``/``);
the block is the path up to the first component that ends in a separator and a number
(``layer.3``, ``layers.0``, ``stages.1``, ``h.5``, ``block_2``; in a ``.`` name a bare number:
``blocks.2.mlp.fc1`` -> ``blocks.2``) and is not the last component;
without one, the parent module: the path without its last two components for ``/`` names, which
end in the op's name (``/pooler/dense/Gemm`` -> ``/pooler``), without its last one for ``.``
names (``block1.conv1`` -> ``block1``); a name with no such path is in the block ``(top level)``.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from onnxprune.check import DEFAULT_MIN_COS
from onnxprune.fmt import fmt_bytes, fmt_int
from onnxprune.report import Report, subgraph_rows

ROW_H = 16
HEAD_H = 22
LABEL_W = 330
BAR_W = 240
GAP = 70
#: Above this many layers the chart shows only the changed ones (the table still lists all).
MAX_CHART_ROWS = 400
#: Dict / list statistics with more entries than this show their first ones and a count.
MAX_STAT_ITEMS = 24

TOP_LEVEL = "(top level)"
_NUMBERED = re.compile(r".[._]\d+$")

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px;color:#1d2330;max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 6px}
.sub{color:#5a6275;font-size:13px;margin-bottom:16px;word-break:break-all}
table{border-collapse:collapse;font-size:13px;margin-bottom:8px} th,td{padding:3px 10px;border-bottom:1px solid #eceef3;
text-align:left;vertical-align:top} th{background:#f4f6fa;font-weight:600}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap} td.s{white-space:nowrap}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{background:#f4f6fa;border-radius:8px;padding:10px 14px;min-width:170px}
.card b{display:block;font-size:20px} .card span{color:#5a6275;font-size:12px;display:block}
.warn{background:#fff6e0;border-left:4px solid #e0a100;padding:6px 10px;margin:4px 0;font-size:13px}
.fail{background:#fdecea;border-left:4px solid #b42318;padding:6px 10px;margin:4px 0;font-size:13px}
.ok{color:#17803d} .bad{color:#b42318} code{font-size:12px}
svg text{font-family:system-ui,sans-serif;font-size:11px;fill:#1d2330}
svg text.dim{fill:#8a91a3} svg text.blk{font-weight:600;font-size:12px}
details{margin-top:10px} summary{cursor:pointer;color:#36c}
.passes{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start} .pass h3{margin-top:4px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _shape(shape: list[int] | None) -> str:
    """``768×3072``; ``-`` for a weight that is not there (removed, or new)."""
    if shape is None:
        return "-"
    return "×".join(str(d) for d in shape) or "scalar"


def block_of(node: str | None) -> tuple[str, str]:
    """``(block, rest)`` of a node name (module docstring's rule).

    >>> block_of("/inner/encoder/layer.3/attention/self/query/MatMul")
    ('/inner/encoder/layer.3', 'attention/self/query/MatMul')
    >>> block_of("/pooler/dense/Gemm")
    ('/pooler', 'dense/Gemm')
    """
    if not node:
        return TOP_LEVEL, ""
    sep = "/" if "/" in node else "."
    lead = sep if sep == "/" and node.startswith("/") else ""
    parts = [p for p in node.split(sep) if p]
    for i, part in enumerate(parts[:-1]):
        if _NUMBERED.search(part) or (sep == "." and i > 0 and part.isdigit()):  # layer.3 | blocks.2.mlp
            return lead + sep.join(parts[: i + 1]), sep.join(parts[i + 1:])
    drop = 2 if sep == "/" else 1  # "/a/b/dense/MatMul" ends in the op's name, "a.b.dense" in the module's
    if len(parts) > drop:
        return lead + sep.join(parts[:-drop]), sep.join(parts[-drop:])
    return TOP_LEVEL, node


def layer_rows(report: Report) -> list[dict[str, Any]]:
    """Join the before/after per-initializer rows by name (before's order, then new ones).

    Returns:
        One dict per initializer with more than one element: ``name``, ``node`` (consuming node or
        None), ``order`` (its graph position, or None), ``weight`` (a Conv/MatMul/Gemm weight; None
        when the rows do not say), ``block``/``label`` (:func:`block_of` of the node),
        ``shape_before``/``shape_after``, ``size_before``/``size_after``,
        ``density_before``/``density_after``, ``kept`` and ``changed``.
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
        node = ref.get("node") or (a or {}).get("node")
        block, label = block_of(node) if node else (TOP_LEVEL, name)
        row = {
            "name": name,
            "node": node,
            "order": ref.get("order"),
            "weight": ref.get("weight"),
            "block": block,
            "label": label or node or name,
            "shape_before": b["shape"] if b else None,
            "shape_after": a["shape"] if a else None,
            "size_before": sb,
            "size_after": sa,
            "density_before": (b["nonzero"] / sb) if b and sb else 0.0,
            "density_after": (a["nonzero"] / sa) if a and sa else 0.0,
            "kept": (sa / sb) if sb else 1.0,
        }
        row["changed"] = b is None or a is None or sa != sb or a["nonzero"] != b["nonzero"]
        rows.append(row)
    return rows


def chart_groups(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The chart's layout: ``[(block, rows), ...]``.

    Only prunable layers (``weight`` true; all rows when the report does not say). Blocks in graph
    order (their first layer's ``order``); in each block the changed layers first, then the others,
    each in graph order. Rows without ``order`` keep their file order, after the ordered ones.
    """
    layers = [r for r in rows if r["weight"] or r["weight"] is None]
    pos = {id(r): i for i, r in enumerate(layers)}

    def key(r: dict[str, Any]) -> tuple[int, int, int]:
        return (0, r["order"], pos[id(r)]) if r["order"] is not None else (1, 0, pos[id(r)])

    blocks: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(layers, key=key):
        blocks.setdefault(r["block"], []).append(r)
    return [(b, [r for r in rs if r["changed"]] + [r for r in rs if not r["changed"]]) for b, rs in blocks.items()]


def _layer_chart(groups: list[tuple[str, list[dict[str, Any]]]]) -> str:
    if not groups:
        return "<p>No per-layer data in this report (it was made without per-initializer rows).</p>"
    top = 34
    n_rows = sum(len(rs) for _, rs in groups)
    height = top + ROW_H * n_rows + HEAD_H * len(groups) + 8
    width = LABEL_W + 2 * BAR_W + GAP + 70
    x1 = LABEL_W
    x2 = LABEL_W + BAR_W + GAP
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="per-layer chart">']
    parts.append(f'<text x="{x1}" y="12" font-weight="600">parameters kept (after / before)</text>')
    parts.append(f'<text x="{x2}" y="12" font-weight="600">density: non-zero share</text>')
    parts.append(f'<rect x="{x1}" y="18" width="10" height="8" fill="#e07a10"/>'
                 f'<text x="{x1 + 14}" y="26">some removed</text>'
                 f'<rect x="{x1 + 104}" y="18" width="10" height="8" fill="#2f6fde"/>'
                 f'<text x="{x1 + 118}" y="26">all kept</text>')
    parts.append(f'<rect x="{x2}" y="18" width="10" height="8" fill="#b8bfcc"/>'
                 f'<text x="{x2 + 14}" y="26">before</text>'
                 f'<rect x="{x2 + 64}" y="18" width="10" height="8" fill="#2f6fde"/>'
                 f'<text x="{x2 + 78}" y="26">after</text>')
    for frac in (0.0, 0.5, 1.0):
        for x0 in (x1, x2):
            x = x0 + frac * BAR_W
            parts.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 4}" '
                         'stroke="#e3e6ed" stroke-width="1"/>')
    y = top
    for block, rs in groups:
        n_changed = sum(1 for r in rs if r["changed"])
        sb = sum(r["size_before"] for r in rs)
        sa = sum(r["size_after"] for r in rs)
        parts.append(f'<rect x="0" y="{y}" width="{width}" height="{HEAD_H}" fill="#eef2fb"/>')
        parts.append(f'<text class="blk" x="6" y="{y + 15}">{_e(block)}</text>')
        parts.append(f'<text x="{x1}" y="{y + 15}">{len(rs)} layer(s), {n_changed} changed; '
                     f'{_pct(sa / sb if sb else 1.0)} of their parameters kept</text>')
        y += HEAD_H
        for i, r in enumerate(rs):
            label = r["label"] if len(r["label"]) <= 48 else "…" + r["label"][-47:]
            tip = (f'{r["node"] or r["name"]} (initializer {r["name"]}): shape {_shape(r["shape_before"])} → '
                   f'{_shape(r["shape_after"])}, size {r["size_before"]:,} → {r["size_after"]:,}, density '
                   f'{_pct(r["density_before"])} → {_pct(r["density_after"])}')
            kept_col = "#2f6fde" if r["size_after"] >= r["size_before"] else "#e07a10"
            parts.append(f'<g><title>{_e(tip)}</title>')
            if i % 2:
                parts.append(f'<rect x="0" y="{y}" width="{width}" height="{ROW_H}" fill="#fafbfd"/>')
            if r["changed"]:
                parts.append(f'<rect x="2" y="{y + 3}" width="4" height="{ROW_H - 6}" fill="#e07a10"/>')
            cls = "" if r["changed"] else ' class="dim"'
            weight = ' font-weight="600"' if r["changed"] else ""
            parts.append(f'<text{cls}{weight} x="{LABEL_W - 8}" y="{y + 12}" text-anchor="end">{_e(label)}</text>')
            parts.append(f'<rect x="{x1}" y="{y + 3}" width="{BAR_W}" height="{ROW_H - 6}" fill="#eef0f4"/>')
            parts.append(f'<rect x="{x1}" y="{y + 3}" width="{BAR_W * min(r["kept"], 1.0):.1f}" '
                         f'height="{ROW_H - 6}" fill="{kept_col}"/>')
            parts.append(f'<text x="{x1 + BAR_W + 4}" y="{y + 12}">{_pct(r["kept"])}</text>')
            parts.append(f'<rect x="{x2}" y="{y + 2}" width="{BAR_W * r["density_before"]:.1f}" height="5" '
                         'fill="#b8bfcc"/>')
            parts.append(f'<rect x="{x2}" y="{y + 8}" width="{BAR_W * r["density_after"]:.1f}" height="5" '
                         'fill="#2f6fde"/>')
            parts.append(f'<text x="{x2 + BAR_W + 4}" y="{y + 12}">{_pct(r["density_after"])}</text></g>')
            y += ROW_H
    parts.append("</svg>")
    return "".join(parts)


def _layer_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    ordered = sorted(rows, key=lambda r: (r["order"] is None, r["order"] or 0))
    body = "".join(
        f'<tr><td>{_e(r["block"])}</td><td><code>{_e(r["label"])}</code></td><td><code>{_e(r["name"])}</code></td>'
        f'<td class="s">{_e(_shape(r["shape_before"]))}</td><td class="s">{_e(_shape(r["shape_after"]))}</td>'
        f'<td class="n">{r["size_before"]:,}</td><td class="n">{r["size_after"]:,}</td>'
        f'<td class="n">{_pct(1 - r["density_before"])}</td><td class="n">{_pct(1 - r["density_after"])}</td></tr>'
        for r in ordered)
    return (f"<details><summary>per-layer table: all {len(rows)} initializers, in graph order</summary><table>"
            "<tr><th>block</th><th>node</th><th>initializer</th><th>shape before</th><th>shape after</th>"
            '<th class="n">size before</th><th class="n">size after</th><th class="n">sparsity before</th>'
            f'<th class="n">sparsity after</th></tr>{body}</table></details>')


def _kept_card(what: str, before: int | None, after: int | None, fmt: Any) -> tuple[str, str, list[str]]:
    if not before:
        return what, fmt(after), ["kept (nothing before to compare)"]
    removed = before - (after or 0)
    share = (after or 0) / before
    return (f"{what} kept", _pct(share),
            [f"{fmt(after)} of {fmt(before)} kept", f"{fmt(removed)} removed"] if removed >= 0 else
            [f"{fmt(after)} from {fmt(before)}", f"grew by {fmt(-removed)}"])


def _summary(report: Report) -> str:
    b, a = report.before, report.after
    cards = [
        _kept_card("parameters", b.parameters, a.parameters, fmt_int),
        _kept_card("non-zero parameters", b.nonzero, a.nonzero, fmt_int),
    ]
    if b.file_size and a.file_size:
        cards.append(_kept_card("file size", b.file_size, a.file_size, fmt_bytes))
    wall = report.wall_seconds
    cards.append(("time", f"{wall:.1f} s total" if wall is not None else f"{report.total_seconds:.2f} s",
                  [f"{report.total_seconds:.1f} s in {len(report.passes)} pass(es)",
                   "the rest: summaries, verification, check"] if wall is not None
                  else [f"in {len(report.passes)} pass(es)", "total not recorded"]))
    html_cards = "".join(f'<div class="card"><span>{_e(k)}</span><b>{_e(v)}</b>'
                         + "".join(f"<span>{_e(line)}</span>" for line in sub) + "</div>"
                         for k, v, sub in cards)
    ops = sorted(set(b.ops) | set(a.ops))
    rows = [("nodes", fmt_int(b.nodes), fmt_int(a.nodes)),
            ("parameters", fmt_int(b.parameters), fmt_int(a.parameters)),
            ("non-zero parameters", fmt_int(b.nonzero), fmt_int(a.nonzero)),
            ("sparsity", _pct(b.sparsity), _pct(a.sparsity)),
            ("weight bytes", fmt_bytes(b.weight_bytes), fmt_bytes(a.weight_bytes)),
            ("file size", fmt_bytes(b.file_size), fmt_bytes(a.file_size) if a.file_size is not None else
             "not written" if report.failures else "not saved")]
    rows += [(k.strip(), x, y) for k, x, y in subgraph_rows(b, a)]
    rows += [(f"op {o}", str(b.ops.get(o, 0)), str(a.ops.get(o, 0))) for o in ops
             if b.ops.get(o, 0) != a.ops.get(o, 0)]
    table = "".join(f'<tr><td>{_e(k)}</td><td class="n">{_e(x)}</td><td class="n">{_e(y)}</td></tr>'
                    for k, x, y in rows)
    return (f'<div class="cards">{html_cards}</div><table><tr><th></th><th class="n">before</th>'
            f'<th class="n">after</th></tr>{table}</table>')


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if v is None:
        return "-"
    return str(v)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def stat_html(value: Any, nodes: dict[str, str] | None = None) -> str:
    """One statistic as HTML: a scalar as text; a dict of dicts of scalars as a table (one row
    per key); a dict of scalars as key / value rows; a list of scalars as a comma list. Past
    :data:`MAX_STAT_ITEMS` entries the rest is counted, not shown; anything deeper is JSON.
    Keys that are initializer names in ``nodes`` (initializer -> consuming node) show the node's
    name beside them."""
    nodes = nodes or {}

    def key_cell(k: Any) -> str:
        node = nodes.get(str(k))
        return (f"<td><code>{_e(k)}</code></td>" if not node else
                f"<td><code>{_e(node)}</code> <span class=\"sub\">({_e(k)})</span></td>")

    if _is_scalar(value):
        return _e(_scalar(value))
    more = ""
    if isinstance(value, (list, tuple)):
        items = list(value)
        if len(items) > MAX_STAT_ITEMS:
            more = f" … and {len(items) - MAX_STAT_ITEMS} more"
        if all(_is_scalar(x) for x in items):
            return _e(", ".join(_scalar(x) for x in items[:MAX_STAT_ITEMS]) + more) if items else "(none)"
        return "<br>".join(f"<code>{_e(json.dumps(x, default=str))}</code>" for x in items[:MAX_STAT_ITEMS]) + _e(more)
    if isinstance(value, dict):
        if not value:
            return "(none)"
        keys = list(value)
        if len(keys) > MAX_STAT_ITEMS:
            more = f"<p>… and {len(keys) - MAX_STAT_ITEMS} more</p>"
        keys = keys[:MAX_STAT_ITEMS]
        if all(isinstance(value[k], dict) and all(_is_scalar(x) for x in value[k].values()) for k in keys):
            cols = list(dict.fromkeys(c for k in keys for c in value[k]))
            head = "".join(f'<th class="n">{_e(_words(c))}</th>' for c in cols)
            body = "".join(key_cell(k)
                           + "".join(f'<td class="n">{_e(_scalar(value[k].get(c)))}</td>' for c in cols) + "</tr>"
                           for k in keys)
            return f"<table><tr><th>{'layer' if nodes else ''}</th>{head}</tr>{body}</table>{more}"
        body = "".join(f"<tr>{key_cell(k)}<td>{stat_html(value[k], nodes)}</td></tr>" for k in keys)
        return f"<table>{body}</table>{more}"
    return _e(str(value))


def _words(key: Any) -> str:
    """A statistic's key as words: ``params_before`` -> ``params before``."""
    return str(key).replace("_", " ")


def _passes(report: Report, nodes: dict[str, str] | None = None) -> str:
    if not report.passes:
        return "<p>No passes ran.</p>"
    head = ("<table><tr><th>pass</th><th>options</th><th>changed</th><th class=\"n\">seconds</th></tr>"
            + "".join(f'<tr><td><b>{_e(p.name)}</b></td><td><code>{_e(", ".join(f"{k}={v}" for k, v in p.options.items()))}'
                      f'</code></td><td>{"yes" if p.modified else "no"}</td><td class="n">{p.seconds:.2f}</td></tr>'
                      for p in report.passes)
            + f'<tr><td colspan="3">all passes</td><td class="n">{report.total_seconds:.2f}</td></tr>'
            + (f'<tr><td colspan="3">whole run (with summaries, verification and the check)</td>'
               f'<td class="n">{report.wall_seconds:.2f}</td></tr>' if report.wall_seconds is not None else "")
            + "</table>")
    sections = []
    for p in report.passes:
        nested = [(k, v) for k, v in p.stats.items() if not _is_scalar(v) and v]
        scalars = [(k, v) for k, v in p.stats.items() if _is_scalar(v)]
        scalars += [(k, "none") for k, v in p.stats.items() if not _is_scalar(v) and not v]
        table = "".join(f'<tr><td>{_e(_words(k))}</td><td class="n">{_e(_scalar(v))}</td></tr>' for k, v in scalars)
        parts = [f'<div class="pass"><h3>{_e(p.name)}</h3>']
        if table:
            parts.append(f"<table>{table}</table>")
        for k, v in nested:
            size = len(v) if isinstance(v, (list, tuple, dict)) else 0
            parts.append(f"<details><summary>{_e(_words(k))} ({size})</summary>{stat_html(v, nodes)}</details>")
        if not scalars and not nested:
            parts.append("<p>(no statistics)</p>")
        parts.append("</div>")
        sections.append("".join(parts))
    return head + '<h3>Statistics</h3><div class="passes">' + "".join(sections) + "</div>"


def _check(report: Report) -> str:
    c = report.check
    if c is None:
        return "<p>No check ran (use <code>--check</code>).</p>"
    inputs = ", ".join(f"{k} {v}" for k, v in c.inputs.items())
    where = ("<b>random</b> inputs synthesised from the graph (real data is stronger evidence)"
             if getattr(c, "synthesized", False) else "the given inputs")
    body = []
    for o in c.outputs:
        cls = "ok" if o.shape_a == o.shape_b and o.cosine >= DEFAULT_MIN_COS else "bad"  # the verdict's default gate
        top1 = "-" if o.top1 is None else f"{o.top1:.4f}"
        body.append(f'<tr><td><code>{_e(o.name)}</code></td><td>{_e(o.shape_a)}</td><td>{_e(o.shape_b)}</td>'
                    f'<td class="n">{o.max_abs:.3g}</td><td class="n">{o.mean_abs:.3g}</td>'
                    f'<td class="n">{o.max_rel:.3g}</td><td class="n {cls}">{o.cosine:.6f}</td>'
                    f'<td class="n">{top1}</td></tr>')
    return (f'<p class="sub">ONNX Runtime CPU, on {where}: {_e(inputs)}</p><table><tr><th>output</th><th>shape ref</th>'
            '<th>shape new</th><th class="n">max abs</th><th class="n">mean abs</th><th class="n">max rel</th>'
            '<th class="n">cosine</th><th class="n">top-1</th></tr>' + "".join(body) + "</table>")


def render_html(report: Report, title: str = "onnxprune report") -> str:
    """The report as a self-contained HTML document (no scripts, no external resources)."""
    rows = layer_rows(report)
    groups = chart_groups(rows)
    n_layers = sum(len(rs) for _, rs in groups)
    changed = sum(1 for _, rs in groups for r in rs if r["changed"])
    note = ""
    if n_layers > MAX_CHART_ROWS:  # a very deep model: chart what changed, the table keeps everything
        kept: list[tuple[str, list[dict[str, Any]]]] = []
        budget = MAX_CHART_ROWS
        for block, rs in groups:
            part = [r for r in rs if r["changed"]][:budget]
            budget -= len(part)
            if part:
                kept.append((block, part))
        groups = kept
        note = (f"<p class=\"sub\">{n_layers} layers: the chart shows the {sum(len(rs) for _, rs in groups)} that "
                "changed" + (f" (first {MAX_CHART_ROWS})" if changed > MAX_CHART_ROWS else "")
                + "; the table lists all.</p>")
    others = [r for r in rows if r["weight"] is False]
    other_note = ""
    if others:
        o_changed = sum(1 for r in others if r["changed"])
        other_note = (f'<p class="sub">Not charted: {len(others)} other initializers (biases, norms, embeddings; '
                      f'{sum(r["size_before"] for r in others):,} parameters, {o_changed} changed); the table '
                      "below lists them.</p>")
    failures = "".join(f'<div class="fail">{_e(f)}</div>' for f in report.failures)
    warnings = "".join(f'<div class="warn">{_e(w)}</div>' for w in report.warnings)
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1>"
        f'<div class="sub">{_e(report.input_path or "(in memory)")} → {_e(report.output_path or "(not saved)")}</div>'
        + (f"<h2>Failed</h2>{failures}" if failures else "")
        + f"{_summary(report)}"
        f"<h2>Prunable layers ({n_layers} layers in {len(groups)} blocks, {changed} changed)</h2>"
        '<p class="sub">By the name of the node that reads each weight, grouped by block in graph order; '
        "in each block the changed layers come first (marked).</p>"
        f"{note}{_layer_chart(groups)}{other_note}"
        f"{_layer_table(rows)}"
        f"<h2>Passes</h2>{_passes(report, {r['name']: r['node'] for r in rows if r['node']})}"
        f"<h2>Check</h2>{_check(report)}"
        + (f"<h2>Warnings</h2>{warnings}" if warnings else "")
        + "</body></html>\n"
    )


__all__ = ["block_of", "chart_groups", "layer_rows", "render_html", "stat_html"]

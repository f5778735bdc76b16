#!/usr/bin/env python3
"""Export a BERT-base ONNX model (random weights) and prune every GEMM weight 2:4 along K.

BERT-base is ``transformers.BertConfig()`` with its defaults (12 layers, hidden 768, FFN 3072,
12 heads), randomly initialised with a fixed seed, exported with the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``, opset 17) with dynamic ``batch`` and ``seq`` axes on
``input_ids``, ``attention_mask``, ``token_type_ids``. Every ``Linear`` becomes ``MatMul(x, W)``
with ``W`` a ``[K, N]`` initializer (the pooler may become ``Gemm`` with ``transB=1``).

Pruning (``--method``):

* ``onnxprune``: the ``nm(n=2,m=4)`` pass of onnxprune (needs ``PYTHONPATH=.`` from the repo
  root);
* ``numpy``: keep the two largest |w| of every group of four along the reduction axis K
  (MatMul ``W[K, N]``: axis 0; Gemm: axis 1 if ``transB`` else 0) — a direct, vectorised fallback
  that needs only ``onnx`` and ``numpy``;
* ``auto`` (default): onnxprune if its ``nm`` pass loads and runs, else numpy.

The result is written to the given path (external data ``PATH.data`` only if the weights exceed
~1.8 GB, which BERT-base does not). Needs torch and transformers.

Example::

    PYTHONPATH=. python scripts/make_bert_24.py /tmp/bert24.onnx
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def export_bert(path: Path, seed: int = 0, layers: int | None = None, seq: int = 128, opset: int = 17) -> None:
    """Export a random-weight BERT-base to ``path`` with the TorchScript exporter."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig()
    if layers:
        cfg.num_hidden_layers = layers
    try:
        model = BertModel(cfg, attn_implementation="eager")
    except TypeError:
        cfg._attn_implementation = "eager"
        model = BertModel(cfg)
    model.eval()

    class Wrapper(torch.nn.Module):
        """Positional inputs -> keyword call (forward signatures differ across versions)."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             return_dict=True)
            return out.last_hidden_state, out.pooler_output

    wrapped = Wrapper(model).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, seq), dtype=torch.long)
    mask = torch.ones(1, seq, dtype=torch.long)
    types = torch.zeros(1, seq, dtype=torch.long)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "token_type_ids": {0: "batch", 1: "seq"}, "last_hidden_state": {0: "batch", 1: "seq"},
            "pooler_output": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(
            wrapped, (ids, mask, types), str(path), dynamo=False, opset_version=opset,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state", "pooler_output"], dynamic_axes=axes,
            do_constant_folding=True,
        )


def prune_24_along(w: np.ndarray, axis: int) -> np.ndarray:
    """Magnitude 2:4 along ``axis`` of a 2-D array (groups of 4 consecutive indices)."""
    a = np.moveaxis(np.asarray(w, dtype=w.dtype), axis, -1)
    rows, k = a.shape
    if k % 4:
        return w
    g = a.reshape(rows, k // 4, 4).copy()
    order = np.argsort(np.abs(g), axis=2)
    np.put_along_axis(g, order[:, :, :2], 0, axis=2)
    return np.ascontiguousarray(np.moveaxis(g.reshape(rows, k), -1, axis))


def prune_numpy(src: Path, dst: Path) -> int:
    """Numpy fallback: 2:4 along K on every constant 2-D MatMul/Gemm weight; returns the count."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src), load_external_data=True)
    inits = {t.name: t for t in model.graph.initializer}
    count = 0
    done: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        name = node.input[1]
        if name in done:
            continue
        t = inits[name]
        if len(t.dims) != 2:
            continue
        w = numpy_helper.to_array(t)
        axis = 0
        if node.op_type == "Gemm":
            trans_b = [a.i for a in node.attribute if a.name == "transB"]
            axis = 1 if trans_b and trans_b[0] else 0
        if w.shape[axis] % 4:
            continue
        t.CopyFrom(numpy_helper.from_array(prune_24_along(w, axis), name))
        done.add(name)
        count += 1
    big = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer) > 1_800_000_000
    if big:
        onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    else:
        onnx.save(model, str(dst))
    return count


def prune_onnxprune(src: Path, dst: Path) -> int:
    """onnxprune's ``nm(n=2,m=4)`` pass; returns the number of weights the pass reports."""
    import onnxprune

    model = onnxprune.load(src)
    result = onnxprune.optimize(model, "nm(n=2,m=4)", inplace=True)
    onnxprune.save(result.model, dst)
    stats = result.report.passes[0].stats if result.report.passes else {}
    for key in ("weights_pruned", "layers", "tensors", "pruned"):
        if isinstance(stats.get(key), int):
            return int(stats[key])
    return -1


def count_24(path: Path) -> tuple[int, int]:
    """(2:4 along K, total) over the model's constant GEMM weights (via sparse_gemm_check)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sparse_gemm_check import find_gemm_weights, is_nm_rows

    weights, _ = find_gemm_weights(path)
    return sum(is_nm_rows(w.wt) for w in weights), len(weights)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="path of the pruned .onnx to write")
    p.add_argument("--method", choices=("auto", "onnxprune", "numpy"), default="auto")
    p.add_argument("--dense-output", help="also keep the unpruned export here")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (default 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--opset", type=int, default=17)
    args = p.parse_args(argv)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bert24-") as tmp:
        dense = Path(args.dense_output) if args.dense_output else Path(tmp) / "bert_dense.onnx"
        t0 = time.perf_counter()
        export_bert(dense, seed=args.seed, layers=args.layers, opset=args.opset)
        print(f"exported {dense} ({dense.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        method = args.method
        n = -1
        if method in ("auto", "onnxprune"):
            try:
                n = prune_onnxprune(dense, out)
                method = "onnxprune"
            except Exception as exc:  # noqa: BLE001
                if args.method == "onnxprune":
                    raise
                print(f"onnxprune nm pass unavailable ({type(exc).__name__}: {str(exc)[:200]}); "
                      "using the numpy fallback", flush=True)
                method = "numpy"
        if method == "numpy":
            n = prune_numpy(dense, out)
        print(f"pruned 2:4 with {method} in {time.perf_counter() - t0:.1f} s -> {out}", flush=True)
    ok, total = count_24(out)
    print(f"{ok}/{total} constant GEMM weights are 2:4 along K (pass reported {n})")
    return 0 if ok > 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

#!/usr/bin/env python3
"""Export Hugging Face models built from their configs (random weights) to ONNX.

Models are ``transformers`` models built from a config, randomly initialised with a fixed seed
(``torch.manual_seed``), in eval mode, and exported with the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``, default opset 17), dynamic ``batch`` and ``seq`` (or
``height``/``width``) axes. No download happens: only configs are used.

Kinds and sizes:

* ``bert`` — ``BertModel``; ``base`` = ``BertConfig()`` defaults (12 layers, hidden 768, FFN 3072,
  ~435 MB); ``tiny`` = hidden 64, 2 layers, 4 heads, FFN 128.
  Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` -> ``last_hidden_state``.
  Every ``Linear`` becomes ``MatMul(x, W[K, N])`` (+ Add); the pooler may become ``Gemm``.
* ``gpt2`` — ``GPT2Model``; ``base`` = ``GPT2Config()`` defaults; ``tiny`` = n_embd 64, 2 layers,
  4 heads. Its ``Conv1D`` layers hold ``[K, N]`` weights used as ``x @ W``.
* ``resnet`` — ``ResNetModel``; ``base`` = ``ResNetConfig()`` (ResNet-50); ``tiny`` = 2 stages of
  widths 16/32, basic blocks. Input ``pixel_values`` -> ``last_hidden_state``.

Usage::

    python scripts/export_hf.py bert /tmp/bert-base.onnx --size base
    python scripts/export_hf.py gpt2 /tmp/gpt2-tiny.onnx --size tiny

Importable: :func:`export_model` (used by tests and benchmarks). Needs torch and transformers.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path
from typing import Any

KINDS = ("bert", "gpt2", "resnet")
SIZES = ("tiny", "base")


def _config(kind: str, size: str) -> Any:
    import transformers as tf

    if kind == "bert":
        if size == "base":
            return tf.BertConfig()
        return tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             vocab_size=1000, max_position_embeddings=128)
    if kind == "gpt2":
        if size == "base":
            return tf.GPT2Config()
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128)
    if kind == "resnet":
        if size == "base":
            return tf.ResNetConfig()
        return tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")


def export_model(kind: str, path: str | os.PathLike[str], *, size: str = "tiny", seed: int = 0, opset: int = 17,
                 seq: int = 16, image: int = 64, config: dict[str, Any] | None = None,
                 widths: list[tuple[int, int]] | None = None) -> Path:
    """Build ``kind`` from its config with random weights and export it to ``path``.

    Args:
        kind: ``bert``, ``gpt2`` or ``resnet``.
        path: Output ``.onnx`` (weights inside the file; external data above 2 GB only).
        size: ``tiny`` or ``base``.
        seed: ``torch.manual_seed`` for the random weights.
        opset: ONNX opset.
        seq: Example sequence length (the exported axis is dynamic).
        image: Example image side for ``resnet`` (dynamic).
        config: Overrides of config fields (e.g. ``{"intermediate_size": 1536}`` for a BERT
            built narrow).
        widths: ``bert`` only: per layer ``(attention heads kept, FFN width)``, a BERT built narrow by
            hand layer by layer (query/key/value/output and the FFN ``Linear`` layers rebuilt at
            those widths), the ideal a structural pruner is compared with.

    Returns:
        The path written.
    """
    import torch
    import transformers as tf

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    torch.manual_seed(seed)
    cfg = _config(kind, size)
    for key, value in (config or {}).items():
        setattr(cfg, key, value)
    path = Path(path)
    if kind == "bert":
        model = tf.BertModel(cfg, add_pooling_layer=False)
        for i, (heads, ffn) in enumerate(widths or []):
            layer = model.encoder.layer[i]
            att = layer.attention.self
            if heads < att.num_attention_heads:  # the Linear layers rebuilt at heads x head size
                width = heads * att.attention_head_size
                att.num_attention_heads, att.all_head_size = heads, width
                att.query, att.key, att.value = (torch.nn.Linear(cfg.hidden_size, width) for _ in range(3))
                layer.attention.output.dense = torch.nn.Linear(width, cfg.hidden_size)
            layer.intermediate.dense = torch.nn.Linear(cfg.hidden_size, ffn)
            layer.output.dense = torch.nn.Linear(ffn, cfg.hidden_size)
        names = ["input_ids", "attention_mask", "token_type_ids"]
        args = (torch.randint(0, cfg.vocab_size, (1, seq)), torch.ones(1, seq, dtype=torch.int64),
                torch.zeros(1, seq, dtype=torch.int64))
        axes = {n: {0: "batch", 1: "seq"} for n in names}
    elif kind == "gpt2":
        model = tf.GPT2Model(cfg)
        model.config.use_cache = False
        names = ["input_ids", "attention_mask"]
        args = (torch.randint(0, cfg.vocab_size, (1, seq)), torch.ones(1, seq, dtype=torch.int64))
        axes = {n: {0: "batch", 1: "seq"} for n in names}
    else:
        model = tf.ResNetModel(cfg)
        names = ["pixel_values"]
        args = (torch.randn(1, 3, image, image),)
        axes = {"pixel_values": {0: "batch", 2: "height", 3: "width"}}
    model.eval()
    model.config.return_dict = False
    outputs = ["last_hidden_state"]
    axes["last_hidden_state"] = {0: "batch"}

    class _Wrap(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            kwargs = dict(zip(names, xs))
            if kind == "gpt2":
                kwargs["use_cache"] = False
            out = self.inner(**kwargs, return_dict=False)
            return out[0]

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Wrap(model), args, str(path), input_names=names, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    return path


def main() -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=KINDS)
    p.add_argument("output")
    p.add_argument("--size", choices=SIZES, default="base")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--opset", type=int, default=17)
    a = p.parse_args()
    t0 = time.perf_counter()
    out = export_model(a.kind, a.output, size=a.size, seed=a.seed, opset=a.opset)
    print(f"wrote {out} ({out.stat().st_size:,} B) in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()

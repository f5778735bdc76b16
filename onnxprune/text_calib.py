"""Calibration data for text models: tokenise a text file with a ``tokenizers`` ``tokenizer.json``.

Each non-empty line of the text file is one sample. Samples are tokenised (special tokens added,
truncated to ``max_len``) and padded to the longest sample, giving ``input_ids`` and
``attention_mask`` (and ``token_type_ids`` of zeros) as int64 ``[samples, seq]`` arrays — the
layout :meth:`onnxprune.analysis.calibration.CalibrationData.from_npz` reads, with padding tokens
marked 0 in the mask so that statistics skip them. Only the inputs the model declares are kept
when a model is given.

Needs the optional ``tokenizers`` package (``pip install onnxprune[text]``).

Command line::

    python -m onnxprune.text_calib sentences.txt tokenizer.json calib.npz [--max-len 128] [--model M.onnx]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxprune.errors import CalibrationError, OnnxPruneError
from onnxprune.ir.load import load

__all__ = ["main", "tokenize_lines", "tokenize_text_file"]


def tokenize_lines(lines: Sequence[str], tokenizer_json: str | os.PathLike[str], *, max_len: int = 128,
                   model: Any = None) -> dict[str, np.ndarray]:
    """Tokenise ``lines`` into padded int64 arrays named like BERT-style model inputs.

    Args:
        lines: The samples.
        tokenizer_json: A Hugging Face ``tokenizer.json``.
        max_len: Truncation length in tokens.
        model: Optional :class:`~onnxprune.ir.model.Model`: keep only the inputs it declares.

    Raises:
        CalibrationError: ``tokenizers`` missing, unreadable tokenizer, no samples.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CalibrationError("text calibration needs the 'tokenizers' package "
                               "(pip install onnxprune[text])") from None
    if not lines:
        raise CalibrationError("no text samples to tokenise")
    try:
        tok = Tokenizer.from_file(str(tokenizer_json))
    except Exception as exc:
        raise CalibrationError(f"{tokenizer_json}: not a readable tokenizer.json ({exc})") from None
    tok.enable_truncation(max_len)
    tok.enable_padding()
    encs = tok.encode_batch(list(lines))
    ids = np.array([e.ids for e in encs], dtype=np.int64)
    out = {"input_ids": ids,
           "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
           "token_type_ids": np.zeros_like(ids)}
    if model is not None:
        inits = {t.name for t in model.graph.initializer}
        wanted = {i.name for i in model.graph.input if i.name not in inits}
        unknown = sorted(wanted - set(out))
        if unknown:
            raise CalibrationError(f"the model wants inputs {unknown}, which text tokenisation does not produce")
        out = {k: v for k, v in out.items() if k in wanted}
    return out


def tokenize_text_file(path: str | os.PathLike[str], tokenizer_json: str | os.PathLike[str], *,
                       max_len: int = 128, model: Any = None) -> dict[str, np.ndarray]:
    """:func:`tokenize_lines` on the non-empty lines of a UTF-8 text file.

    Raises:
        CalibrationError: missing file, or see :func:`tokenize_lines`.
    """
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"{p}: text file not found")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return tokenize_lines(lines, tokenizer_json, max_len=max_len, model=model)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m onnxprune.text_calib TEXT TOKENIZER_JSON OUT.npz``."""
    ap = argparse.ArgumentParser(description="tokenise a text file into a calibration .npz")
    ap.add_argument("text")
    ap.add_argument("tokenizer")
    ap.add_argument("out")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--model", help="keep only the inputs this .onnx model declares")
    args = ap.parse_args(argv)
    try:
        model = None
        if args.model:
            model = load(args.model)
        arrays = tokenize_text_file(args.text, args.tokenizer, max_len=args.max_len, model=model)
    except OnnxPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    np.savez(args.out, **arrays)
    print(f"{args.out}: {arrays['input_ids'].shape[0]} samples x {arrays['input_ids'].shape[1]} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())

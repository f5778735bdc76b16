"""Calibration data for text models: tokenise a text file with a ``tokenizers`` ``tokenizer.json``.

Each non-empty line of the text file is one sample. Samples are tokenised (special tokens added)
into ``input_ids``, ``attention_mask`` and ``token_type_ids`` ``[samples, seq]`` arrays -- the
layout :meth:`onnxprune.analysis.calibration.CalibrationData.from_npz` reads, with padding
tokens marked 0 in the mask so that statistics skip them.

**The model decides** (``--model``, which the command line asks for): only the inputs the
model declares are written, in its element type (``int64`` or ``int32``); an input the tokenizer
cannot make is an error naming it. When the model fixes the sequence axis (axis 1 of its token
inputs is a number, e.g. ``[1, 128]``), every sample is padded *and* truncated to exactly that
length, whatever ``max_len`` says; otherwise samples are truncated to ``max_len`` (default 128)
and padded to the longest one. Without a model all three arrays are written, int64, padded to
the longest sample, and a note says what was guessed.

Needs the optional ``tokenizers`` package (``pip install onnxprune[text]``).

Command line::

    python -m onnxprune.text_calib sentences.txt tokenizer.json calib.npz --model model.onnx [--max-len 128]
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
from onnxprune.ir.io import TensorSig, graph_io
from onnxprune.ir.load import load

__all__ = ["DEFAULT_MAX_LEN", "fixed_length", "main", "tokenize_lines", "tokenize_text_file"]

#: Truncation length when neither the model nor the caller fixes one.
DEFAULT_MAX_LEN = 128
#: What tokenisation produces; a model input of another name cannot be fed from text.
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_NP_DTYPES = {"INT64": np.int64, "INT32": np.int32}


def fixed_length(inputs: Sequence[TensorSig]) -> int | None:
    """The sequence length the model fixes: axis 1 of its token inputs when that is a number.

    Raises:
        CalibrationError: two token inputs fix different lengths.
    """
    fixed = {s.name: s.shape[1] for s in inputs
             if s.name in TEXT_INPUTS and s.shape is not None and len(s.shape) >= 2 and isinstance(s.shape[1], int)}
    if len(set(fixed.values())) > 1:
        raise CalibrationError(f"the model's inputs fix different sequence lengths: {fixed}")
    return next(iter(fixed.values()), None)


def tokenize_lines(lines: Sequence[str], tokenizer_json: str | os.PathLike[str], *, max_len: int | None = None,
                   model: Any = None) -> dict[str, np.ndarray]:
    """Tokenise ``lines`` into padded integer arrays named like BERT-style model inputs.

    Args:
        lines: The samples.
        tokenizer_json: A Hugging Face ``tokenizer.json``.
        max_len: Truncation length in tokens (default :data:`DEFAULT_MAX_LEN`); a length the model
            fixes wins (module docstring).
        model: Optional :class:`~onnxprune.ir.model.Model`: its inputs, their element types and
            its fixed sequence length decide what is written.

    Raises:
        CalibrationError: ``tokenizers`` missing, unreadable tokenizer, no samples, an input the
            model wants that tokenisation does not produce.
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
    inputs = graph_io(model.graph)[0] if model is not None else []
    if model is not None:
        unknown = [s.name for s in inputs if s.name not in TEXT_INPUTS]
        if unknown:
            raise CalibrationError(f"the model wants inputs {unknown}, which text tokenisation does not produce "
                                   f"(it makes {', '.join(TEXT_INPUTS)})")
    fixed = fixed_length(inputs)
    length = fixed or max_len or DEFAULT_MAX_LEN
    tok.enable_truncation(length)
    if fixed:
        tok.enable_padding(length=fixed)
    else:
        tok.enable_padding()
    encs = tok.encode_batch(list(lines))
    ids = np.array([e.ids for e in encs], dtype=np.int64)
    out = {"input_ids": ids,
           "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
           "token_type_ids": np.zeros_like(ids)}
    if model is not None:
        out = {s.name: out[s.name].astype(_NP_DTYPES.get(s.dtype, np.int64), copy=False) for s in inputs}
    return out


def tokenize_text_file(path: str | os.PathLike[str], tokenizer_json: str | os.PathLike[str], *,
                       max_len: int | None = None, model: Any = None) -> dict[str, np.ndarray]:
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
    """``python -m onnxprune.text_calib TEXT TOKENIZER_JSON OUT.npz --model M.onnx``."""
    ap = argparse.ArgumentParser(prog="python -m onnxprune.text_calib",
                                 description="tokenise a text file (one sample a line) into a calibration .npz")
    ap.add_argument("text", help="UTF-8 text file, one sample per non-empty line")
    ap.add_argument("tokenizer", help="the model's Hugging Face tokenizer.json")
    ap.add_argument("out", help="output .npz")
    ap.add_argument("--model", help="the .onnx the data is for: write only its inputs, in its types, padded and "
                    "truncated to its fixed sequence length if it has one (recommended)")
    ap.add_argument("--max-len", type=int, default=None,
                    help=f"truncation length when the model does not fix one (default {DEFAULT_MAX_LEN})")
    args = ap.parse_args(argv)
    if args.max_len is not None and args.max_len < 1:
        print("error: --max-len must be positive", file=sys.stderr)
        return 2
    try:
        model = load(args.model) if args.model else None
        arrays = tokenize_text_file(args.text, args.tokenizer, max_len=args.max_len, model=model)
    except OnnxPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    np.savez(args.out, **arrays)
    first = next(iter(arrays.values()))
    fixed = fixed_length(graph_io(model.graph)[0]) if model is not None else None
    how = ("fixed by the model" if fixed else "padded to the longest sample")
    print(f"{args.out}: {first.shape[0]} samples x {first.shape[1]} tokens ({how}); inputs "
          f"{', '.join(f'{k} {v.dtype}' for k, v in arrays.items())}")
    if model is None:
        print("note: no --model given, so all of input_ids, attention_mask and token_type_ids were written and "
              "padded to the longest sample; give --model M.onnx to write only the inputs the model has, at "
              "its fixed sequence length", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

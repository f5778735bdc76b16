"""The ONNX Runtime CPU check path: run two models on the same inputs and compare outputs.

For every output present in both models the comparison reports

* ``max_abs``  = max |a - b|
* ``mean_abs`` = mean |a - b|
* ``max_rel``  = max |a - b| / max |a|   (relative to the reference's scale, so near-zero
  reference values do not blow it up)
* ``cosine``   = <a, b> / (|a| |b|) over the flattened tensors (float64)
* ``top1``     = share of rows whose argmax over the last axis agrees (only for float outputs
  whose last axis has more than one element).
* ``pooled_cosine`` (with ``pool="mean"``, for text-embedding outputs ``[B, S, H]``): mean over
  the batch of the cosine between mean-pooled token vectors, padding tokens excluded through the
  feed's attention mask (an input whose name contains ``mask``), i.e. what sentence-embedding
  models compare.

Inputs come from an ``.npz`` file (arrays named after the model inputs), a dict, or are generated
from the declared input types: float inputs standard normal, integer inputs in ``[0, 100)``
(``*mask*`` inputs all ones, ``*type*`` inputs zeros), with dynamic dimensions taken from
``dims`` (name -> value) or 1 for the first axis and 16 otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxprune.errors import CheckError
from onnxprune.ir.model import Model
from onnxprune.ir.save import temporary_file

DEFAULT_BATCH = 1
DEFAULT_DIM = 16


@dataclass
class OutputDiff:
    """Differences on one output."""

    name: str
    shape_a: list[int]
    shape_b: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    top1: float | None
    pooled_cosine: float | None = None

    def within(self, atol: float | None, rtol: float | None) -> bool:
        """True if ``max_abs <= atol`` and ``max_rel <= rtol`` (each only when given)."""
        if self.shape_a != self.shape_b:
            return False
        if atol is not None and not self.max_abs <= atol:
            return False
        return not (rtol is not None and not self.max_rel <= rtol)


@dataclass
class CheckResult:
    """Comparison of two models on the same inputs."""

    outputs: list[OutputDiff]
    inputs: dict[str, list[int]]

    def within(self, atol: float | None = None, rtol: float | None = None) -> bool:
        """True if every output is within the tolerances."""
        return all(o.within(atol, rtol) for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"inputs": self.inputs, "outputs": [asdict(o) for o in self.outputs]}

    def format(self) -> str:
        """A terminal table."""
        head = f"{'output':<28} {'max_abs':>10} {'max_rel':>10} {'mean_abs':>10} {'cosine':>10} {'top1':>7}"
        lines = [head, "-" * len(head)]
        for o in self.outputs:
            top1 = f"{o.top1:.4f}" if o.top1 is not None else "-"
            name = o.name if len(o.name) <= 28 else o.name[:25] + "..."
            lines.append(f"{name:<28} {o.max_abs:>10.3g} {o.max_rel:>10.3g} {o.mean_abs:>10.3g} "
                         f"{o.cosine:>10.6f} {top1:>7}"
                         + (f"  pooled cosine {o.pooled_cosine:.6f}" if o.pooled_cosine is not None else ""))
        return "\n".join(lines)


def make_session(model: Model | str | os.PathLike[str], threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for a model object or path.

    Raises:
        CheckError: ONNX Runtime refuses the model.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    try:
        if isinstance(model, Model):
            if not model.external and model.proto.ByteSize() < 1_900_000_000:
                return ort.InferenceSession(model.proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
            with temporary_file(model) as p:
                return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CheckError(f"ONNX Runtime cannot load the model: {' '.join(str(exc).split())[:400]}") from None


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_, "tensor(int16)": np.int16,
}


def random_feeds(session: Any, dims: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching a session's declared input types and shapes."""
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    feeds = {}
    for inp in session.get_inputs():
        shape = []
        for axis, d in enumerate(inp.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif isinstance(d, str) and d in dims:
                shape.append(int(dims[d]))
            else:
                shape.append(DEFAULT_BATCH if axis == 0 else DEFAULT_DIM)
        dtype = _ORT_TYPES.get(inp.type)
        if dtype is None:
            raise CheckError(f"input {inp.name!r} has type {inp.type}, which random inputs do not support; "
                             "pass --inputs DATA.npz")
        lname = inp.name.lower()
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[inp.name] = np.ones(shape, dtype=bool)
        elif "mask" in lname:
            feeds[inp.name] = np.ones(shape, dtype=dtype)
        elif "type" in lname:
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
        else:
            feeds[inp.name] = rng.integers(0, 100, size=shape).astype(dtype)
    return feeds


def load_feeds(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read inputs from an ``.npz`` file.

    Raises:
        CheckError: missing or unreadable file.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckError(f"{p}: inputs file not found")
    try:
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise CheckError(f"{p}: not a readable .npz file ({exc})") from None


def _validate_feeds(session: Any, feeds: Mapping[str, np.ndarray], which: str) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise CheckError(f"{which}: inputs {missing} missing from the given data (it has {sorted(feeds)})")
    out = {}
    for inp in session.get_inputs():
        arr = np.asarray(feeds[inp.name])
        want = _ORT_TYPES.get(inp.type)
        if want is not None and arr.dtype != want:
            raise CheckError(f"{which}: input {inp.name!r} is {arr.dtype}, the model wants {np.dtype(want)}")
        if len(arr.shape) != len(inp.shape):
            raise CheckError(f"{which}: input {inp.name!r} has rank {arr.ndim}, the model wants {len(inp.shape)}")
        for a, d in zip(arr.shape, inp.shape):
            if isinstance(d, int) and d > 0 and a != d:
                raise CheckError(f"{which}: input {inp.name!r} has shape {list(arr.shape)}, the model wants {inp.shape}")
        out[inp.name] = arr
    return out


def diff_outputs(name: str, a: np.ndarray, b: np.ndarray) -> OutputDiff:
    """Compare one reference output ``a`` with a candidate ``b``."""
    if a.shape != b.shape or a.dtype.kind not in "fiub" or b.dtype.kind not in "fiub":
        return OutputDiff(name, list(a.shape), list(b.shape), float("inf"), float("inf"), float("inf"), 0.0, None)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    d = np.abs(a64 - b64)
    max_abs = float(d.max()) if d.size else 0.0
    mean_abs = float(d.mean()) if d.size else 0.0
    scale = float(np.abs(a64).max()) if a64.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    cosine = float(a64.ravel() @ b64.ravel() / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    top1 = None
    if a.dtype.kind == "f" and a.ndim >= 1 and a.shape[-1] > 1:
        top1 = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    return OutputDiff(name, list(a.shape), list(b.shape), max_abs, mean_abs, max_rel, cosine, top1)


def mean_pooled_cosine(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean over the batch of cos(mean-pool(a_i), mean-pool(b_i)) for ``[B, S, H]`` outputs.

    Args:
        a: Reference token vectors ``[B, S, H]``.
        b: Candidate token vectors, same shape.
        mask: ``[B, S]`` attention mask (1 = real token); all tokens count when None.
    """
    w = np.ones(a.shape[:2]) if mask is None else (np.asarray(mask) > 0).astype(np.float64)
    denom = np.maximum(w.sum(1, keepdims=True), 1.0)
    pa = (a.astype(np.float64) * w[..., None]).sum(1) / denom
    pb = (b.astype(np.float64) * w[..., None]).sum(1) / denom
    na, nb = np.linalg.norm(pa, axis=1), np.linalg.norm(pb, axis=1)
    cos = (pa * pb).sum(1) / np.maximum(na * nb, 1e-30)
    return float(cos.mean())


def sentence_embeddings(session: Any, feeds: Iterable[Mapping[str, np.ndarray]], output: int = 0,
                        mask_input: str = "attention_mask") -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings ``[N, H]`` from a text encoder's ``[B, S, H]`` output.

    Args:
        session: An ONNX Runtime session (see :func:`make_session`).
        feeds: Batches of inputs; padding tokens (``mask_input`` == 0) are left out of the mean.
        output: Index of the ``[B, S, H]`` output.
        mask_input: Name of the attention-mask input.
    """
    outs = []
    for f in feeds:
        h = np.asarray(session.run(None, dict(f))[output], dtype=np.float64)
        m = np.asarray(f[mask_input], dtype=np.float64)[..., None]
        e = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        outs.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30))
    return np.concatenate(outs)


def neighbour_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> float:
    """Mean share of each row's ``k`` nearest neighbours (cosine, self excluded) that both agree on.

    Args:
        reference: Normalised embeddings ``[N, H]`` of the reference model.
        candidate: Embeddings of the same N inputs from the candidate model.
        k: Neighbours per row.
    """
    def knn(e: np.ndarray) -> np.ndarray:
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    a, b = knn(reference), knn(candidate)
    hits = (a[:, :, None] == b[:, None, :]).any(-1).sum(1)
    return float(hits.mean() / k)


def compare(
    reference: Model | str | os.PathLike[str],
    candidate: Model | str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray] | str | os.PathLike[str] | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    threads: int | None = None,
    pool: str | None = None,
) -> CheckResult:
    """Run both models on ONNX Runtime CPU with the same inputs and compare their outputs.

    Args:
        reference: The model whose outputs count as right (a Model or a path).
        candidate: The model to check.
        feeds: Inputs (dict or .npz path); random inputs of the declared shapes when None.
        dims: Values of dynamic dimensions for random inputs.
        seed: Seed of the random inputs.
        threads: ONNX Runtime intra-op threads.
        pool: ``"mean"`` to also report the mean-pooled cosine of ``[B, S, H]`` outputs.

    Raises:
        CheckError: a model does not load or run, inputs do not match, or no output is shared.
    """
    if pool not in (None, "mean"):
        raise CheckError(f"pool must be 'mean' or None, got {pool!r}")
    sa, sb = make_session(reference, threads), make_session(candidate, threads)
    if feeds is None:
        feed = random_feeds(sa, dims, seed)
    elif isinstance(feeds, (str, os.PathLike)):
        feed = load_feeds(feeds)
    else:
        feed = dict(feeds)
    fa = _validate_feeds(sa, feed, "reference")
    fb = _validate_feeds(sb, feed, "candidate")
    names_a = [o.name for o in sa.get_outputs()]
    names_b = {o.name for o in sb.get_outputs()}
    shared = [n for n in names_a if n in names_b]
    if not shared:
        raise CheckError("the two models share no output name")
    try:
        out_a = sa.run(shared, fa)
        out_b = sb.run(shared, fb)
    except Exception as exc:
        raise CheckError(f"ONNX Runtime failed to run: {' '.join(str(exc).split())[:400]}") from None
    diffs = [diff_outputs(n, np.asarray(a), np.asarray(b)) for n, a, b in zip(shared, out_a, out_b)]
    if pool == "mean":
        mask_names = [k for k in fa if "mask" in k.lower() and np.asarray(fa[k]).ndim == 2]
        for d, a, b in zip(diffs, out_a, out_b):
            a, b = np.asarray(a), np.asarray(b)
            if a.ndim == 3 and a.shape == b.shape and a.dtype.kind == "f":
                m = fa[mask_names[0]] if mask_names and fa[mask_names[0]].shape == a.shape[:2] else None
                d.pooled_cosine = mean_pooled_cosine(a, b, m)
    return CheckResult(diffs, {k: list(v.shape) for k, v in fa.items()})


def run_model(model: Model | str | os.PathLike[str], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a model on ONNX Runtime CPU; return outputs by name."""
    s = make_session(model)
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, dict(feeds))))


__all__ = ["CheckResult", "OutputDiff", "compare", "diff_outputs", "load_feeds", "make_session", "mean_pooled_cosine",
           "neighbour_agreement", "sentence_embeddings",
           "random_feeds", "run_model"]

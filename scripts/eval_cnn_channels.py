"""Channel pruning of a real CNN with and without reconstruction: PP-OCR mobile v2.0 text-direction classifier.

Model: ``ppocr_cls`` of the real-model corpus (``scripts/real_models_corpus.toml``: the
MobileNetV3 classifier shipped in the ``rapidocr-onnxruntime`` wheel; cached under
``~/.cache/onnxprune-real-models``). It tells text lines that are upright (class 0) from lines
turned by 180 degrees (class 1).

Images: the wheels ship no photographs, so text lines are rendered with Pillow (``pip install
pillow``) from the standard library's docstring sentences (3-7 words), in the system's TrueType
fonts (DejaVu, Liberation), random size, ink and paper grey levels; half of them are turned by 180
degrees (label 1). Pre-processing is PP-OCR's: resize to height 48 keeping the aspect ratio (width
at most 192), ``(x / 255 - 0.5) / 0.5``, zero padding on the right to 192. Calibration and
evaluation images come from disjoint sentences.

For each pipeline the script reports accuracy against the labels, top-1 agreement with the dense
model, mean ``|p_pruned - p_dense|`` of the class-1 probability, parameters, the pass's CPU time
(process time) and ONNX Runtime CPU latency (:func:`onnxprune.bench.measure`, 2 threads, batch 1,
interleaved) with the speedup over dense.

Usage::

    python scripts/eval_cnn_channels.py [--calib 256] [--eval 512] [--runs 50] [--out results/x.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tomllib

HERE = Path(__file__).resolve().parent
FONTS = sorted(p for p in Path("/usr/share/fonts").rglob("*.ttf") if "Math" not in p.name)
OUT_NAME = "save_infer_model/scale_0.tmp_1"


def model_path() -> Path:
    """The cached ``ppocr_cls`` model (fetched from its wheel by ``scripts/real_models.py`` if needed)."""
    sys.path.insert(0, str(HERE))
    import real_models

    corpus = tomllib.loads((HERE / "real_models_corpus.toml").read_text())
    entry = next(m for m in corpus["model"] if m["id"] == "ppocr_cls")
    return real_models.fetch(entry, Path.home() / ".cache" / "onnxprune-real-models")


def render(texts: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images [n, 3, 48, 192] float32, labels [n])``: rendered lines, every second one turned by 180°."""
    from PIL import Image, ImageDraw, ImageFont

    if not FONTS:
        raise SystemExit("no TrueType fonts under /usr/share/fonts")
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for i, text in enumerate(texts):
        font = ImageFont.truetype(str(FONTS[rng.integers(len(FONTS))]), int(rng.integers(22, 38)))
        x0, y0, x1, y1 = font.getbbox(text)
        pad = int(rng.integers(2, 10))
        paper, ink = int(rng.integers(190, 256)), int(rng.integers(0, 90))
        im = Image.new("RGB", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), (paper,) * 3)
        ImageDraw.Draw(im).text((pad - x0, pad - y0), text, font=font, fill=(ink,) * 3)
        label = i % 2
        if label:
            im = im.rotate(180)
        w = min(192, int(np.ceil(48 * im.width / im.height)))
        arr = np.asarray(im.resize((w, 48), Image.BILINEAR), dtype=np.float32) / 255.0
        out = np.zeros((3, 48, 192), np.float32)
        out[:, :, :w] = ((arr - 0.5) / 0.5).transpose(2, 0, 1)
        imgs.append(out)
        labels.append(label)
    return np.stack(imgs), np.array(labels)


def chunks(sentences: list[str], n: int, seed: int) -> list[str]:
    """``n`` text lines of 3-7 consecutive words from ``sentences``."""
    rng = np.random.default_rng(seed)
    out = []
    for s in sentences[:n]:
        words = s.split()
        k = int(rng.integers(3, 8))
        j = int(rng.integers(0, max(len(words) - k, 0) + 1))
        out.append(" ".join(words[j:j + k]))
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=256, help="calibration images")
    ap.add_argument("--eval", type=int, default=512, help="evaluation images")
    ap.add_argument("--runs", type=int, default=50, help="latency rounds")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    import onnxprune
    from onnxprune.bench import measure
    from onnxprune.summary import summarize

    sys.path.insert(0, str(HERE))
    from eval_minilm_structured import stdlib_sentences

    sents = stdlib_sentences()
    order = np.random.default_rng(1).permutation(len(sents))
    calib_s = [sents[i] for i in order[:args.calib]]
    eval_s = [sents[i] for i in order[args.calib:args.calib + args.eval]]
    xc, _ = render(chunks(calib_s, args.calib, 0), seed=0)
    xe, ye = render(chunks(eval_s, args.eval, 1), seed=1)
    calib = [{"x": xc[i:i + 16]} for i in range(0, len(xc), 16)]
    path = model_path()
    dense = onnxprune.load(path)
    so = ort.SessionOptions()
    so.log_severity_level = 3

    def probs(model: object) -> np.ndarray:
        tmp = Path("/tmp") / f"eval_cnn_{id(model)}.onnx"
        onnxprune.save(model, tmp)
        sess = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run([OUT_NAME], {"x": xe[i:i + 32]})[0] for i in range(0, len(xe), 32)])

    ref = probs(dense)
    r = args.ratio
    specs = [f"channels(ratio={r})", f"channels(ratio={r},reconstruct=true)",
             f"channels(ratio={r},reconstruct=true,sequential=true)",
             f"channels(ratio={r},criterion=activation)",
             f"channels(ratio={r},criterion=activation,reconstruct=true,sequential=true)"]
    rows = [("dense", summarize(dense).parameters, float((ref.argmax(1) == ye).mean()), 1.0, 0.0, 0.0)]
    models = [dense]
    for spec in specs:
        t0 = time.process_time()
        res = onnxprune.optimize(dense, spec, calibration=calib)
        cpu = time.process_time() - t0
        p = probs(res.model)
        rows.append((spec, summarize(res.model).parameters, float((p.argmax(1) == ye).mean()),
                     float((p.argmax(1) == ref.argmax(1)).mean()), float(np.abs(p[:, 1] - ref[:, 1]).mean()), cpu))
        models.append(res.model)
        print(f"done {spec}: acc={rows[-1][2]:.3f} agree={rows[-1][3]:.3f}", file=sys.stderr, flush=True)
    times = measure(models, {"x": xe[:1]}, threads=2, runs=args.runs)
    lines = [f"PP-OCR mobile v2.0 text-direction classifier (ppocr_cls, real weights), {len(xe)} rendered held-out "
             f"text lines (half turned 180°), {len(xc)} disjoint calibration lines; latency: "
             f"ONNX Runtime {ort.__version__} CPU, 2 threads, batch 1x3x48x192, {args.runs} interleaved rounds", "",
             "| pipeline | params | accuracy | top-1 agreement with dense | mean abs prob diff | pass CPU s "
             "| latency ms | speedup |", "|---|---|---|---|---|---|---|---|"]
    for (spec, params, acc, agree, dp, cpu), t in zip(rows, times):
        lines.append(f"| {spec} | {params:,} | {acc:.3f} | {agree:.3f} | {dp:.4f} | {cpu:.1f} | "
                     f"{t.median_ms:.2f} | {times[0].median_ms / t.median_ms:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

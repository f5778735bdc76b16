"""The bare ``onnxprune optimize`` on the model-zoo graphs the ``onnx`` wheel ships, checked independently.

Each ``onnx/backend/test/data/light/light_*.onnx`` model gets random weights in place of its
``ConstantOfShape`` stand-ins (``tests/test_channels_zoo.zoo_model``, seeded), then

1. ``onnxprune optimize MODEL -o OUT --time-limit S --json`` (no ``--passes``, no data: random inputs),
2. ``onnxprune check MODEL OUT --seed 7 --json`` on inputs the search never saw,

and one JSON row per model is printed: exit code, wall seconds, chosen spec and why, and the
check's verdict, worst cosine and worst top-1. Random weights prune far more easily than trained
ones: this measures that the command runs and keeps its budget on these graphs, not what it buys
on trained models.

Usage: ``python scripts/zoo_auto.py [--time-limit 90] [--out rows.json] [--work DIR]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_channels_zoo import zoo_model  # noqa: E402

NAMES = ["resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet", "squeezenet", "vgg19",
         "bvlc_alexnet", "zfnet512"]


def run_one(name: str, work: Path, time_limit: float) -> dict:
    """Build, search, check one zoo model; the row described in the module docstring."""
    src, out = work / f"{name}.onnx", work / f"{name}.auto.onnx"
    onnx.save(zoo_model(name), str(src))
    t = time.perf_counter()
    r = subprocess.run(["onnxprune", "optimize", str(src), "-o", str(out), "--time-limit", str(time_limit), "--json"],
                       capture_output=True, text=True)
    row: dict = {"model": name, "rc": r.returncode, "seconds": round(time.perf_counter() - t, 1),
                 "time_limit": time_limit}
    if r.returncode != 0:
        row["error"] = r.stderr[-500:]
        return row
    rep = json.loads(r.stdout)
    row.update(spec=rep.get("winner", {}).get("spec"), reason=rep.get("reason"))
    c = subprocess.run(["onnxprune", "check", str(src), str(out), "--seed", "7", "--json"],
                       capture_output=True, text=True)
    row["check_rc"] = c.returncode
    cj = json.loads(c.stdout)
    top1 = [o["top1"] for o in cj["outputs"] if o["top1"] is not None]
    row.update(verdict=cj["verdict"]["status"], min_cos=min(o["cosine"] for o in cj["outputs"]),
               min_top1=min(top1) if top1 else None)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=90.0)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--work", type=Path, default=None, help="folder for the models (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in NAMES:
            rows.append(run_one(name, work, args.time_limit))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    bad = [r["model"] for r in rows if r["rc"] != 0 or r.get("verdict") != "kept"]
    print(f"{len(rows) - len(bad)}/{len(rows)} ran and kept the budget on the checker's inputs"
          + (f"; not: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

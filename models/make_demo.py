"""Write the bundled demo model and its sample input.

Writes ``onnxprune/data/demo_cnn.onnx`` (:func:`models.build_demo_model` with seed 0) and
``onnxprune/data/demo_cnn_inputs.npz`` (array ``input``, float32 [4, 3, 32, 32], standard normal
from ``numpy.random.default_rng(0)``).

Usage (from the repository root)::

    python -m models.make_demo [--out-dir DIR]
    python models/make_demo.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make the ``models`` package importable
    sys.path.insert(0, str(REPO_ROOT))

from models import build_demo_model, random_inputs  # noqa: E402

DEFAULT_OUT_DIR = REPO_ROOT / "onnxprune" / "data"
MODEL_FILE = "demo_cnn.onnx"
INPUTS_FILE = "demo_cnn_inputs.npz"
SAMPLE_BATCH = 4


def write_demo(out_dir: Path = DEFAULT_OUT_DIR, seed: int = 0) -> tuple[Path, Path]:
    """Build the demo model and a sample input and write them to ``out_dir``.

    Args:
        out_dir: Destination folder (created if missing).
        seed: Seed for both the weights and the sample input.

    Returns:
        Paths of the written model and inputs files.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_demo_model(seed=seed)
    onnx.checker.check_model(model, full_check=True)
    model_path = out_dir / MODEL_FILE
    model_path.write_bytes(model.SerializeToString())
    inputs = random_inputs(model, batch=SAMPLE_BATCH, seed=seed)
    inputs_path = out_dir / INPUTS_FILE
    np.savez(inputs_path, **inputs)
    return model_path, inputs_path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="destination folder")
    args = parser.parse_args(argv)
    for path in write_demo(args.out_dir):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

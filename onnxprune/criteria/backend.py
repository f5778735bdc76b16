"""Where the calibration maths runs: numpy on the CPU, or PyTorch (on CUDA when there is a GPU).

Two pieces of work dominate SparseGPT on large models: the Hessian products ``H += xᵀx`` while
calibrating (``T·K²`` multiply-adds per activation and batch) and the OBS solve of each weight
(Cholesky factor of ``H⁻¹``, ``K³``, then the column loop with lazy block updates, ``K²·N``).
Both are float64 in every backend, so the backends agree to float tolerance (summation order and
LAPACK kernels differ in the last bits; ties in the saliency can then fall the other way).

Backends (option ``backend`` of ``masks``/``nm``):

* ``numpy`` — the reference; what runs without PyTorch;
* ``torch`` — PyTorch on CUDA when ``torch.cuda.is_available()``, else on the CPU (the stand-in
  the tests use); ``torch:cpu`` / ``torch:cuda`` name the device;
* ``auto`` (default) — ``torch`` on CUDA when PyTorch and a GPU are there, else ``numpy``.

PyTorch is the optional extra ``onnxprune[gpu-solve]``; nothing imports it unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxprune.errors import PipelineError

BACKENDS = ("auto", "numpy", "torch", "torch:cpu", "torch:cuda")
#: Rows of activations converted to float64 at a time (the numpy accumulator's step).
ROW_CHUNK = 8192


@dataclass(frozen=True)
class Backend:
    """A resolved backend: ``kind`` ``numpy`` or ``torch``, and the torch device."""

    kind: str
    device: str = "cpu"

    def __str__(self) -> str:
        return self.kind if self.kind == "numpy" else f"torch:{self.device}"


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve(name: str | Backend | None) -> Backend:
    """The backend ``name`` stands for (see the module docstring).

    Raises:
        PipelineError: an unknown name, or ``torch`` without PyTorch (``torch:cuda`` without a GPU).
    """
    if isinstance(name, Backend):
        return name
    name = (name or "auto").lower()
    if name not in BACKENDS:
        raise PipelineError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "numpy":
        return Backend("numpy")
    if name == "auto":
        return Backend("torch", "cuda") if _cuda() else Backend("numpy")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise PipelineError(f"backend={name} needs PyTorch: pip install 'onnxprune[gpu-solve]'") from None
    if name == "torch:cuda" and not _cuda():
        raise PipelineError("backend=torch:cuda: PyTorch sees no CUDA device")
    device = name.split(":", 1)[1] if ":" in name else ("cuda" if _cuda() else "cpu")
    return Backend("torch", device)


class Gram:
    """An accumulator of ``Σ xᵀx`` (float64) over ``[T, C]`` row blocks on one backend."""

    def __init__(self, backend: Backend, channels: int) -> None:
        self.backend = backend
        if backend.kind == "numpy":
            self.acc: Any = np.zeros((channels, channels), dtype=np.float64)
        else:
            import torch

            self.acc = torch.zeros((channels, channels), dtype=torch.float64, device=backend.device)

    def add(self, rows: np.ndarray) -> None:
        """Add ``rowsᵀ rows``."""
        if self.backend.kind == "numpy":
            for r0 in range(0, rows.shape[0], ROW_CHUNK):
                x = rows[r0:r0 + ROW_CHUNK].astype(np.float64)
                self.acc += x.T @ x
            return
        import torch

        x = torch.from_numpy(np.ascontiguousarray(rows)).to(self.backend.device).to(torch.float64)
        self.acc.addmm_(x.T, x)

    def result(self) -> np.ndarray:
        """The sum as a numpy array."""
        return self.acc if self.backend.kind == "numpy" else self.acc.cpu().numpy()

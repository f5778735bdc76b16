"""onnxprune: prune exported ONNX models.

Python API::

    import onnxprune
    model = onnxprune.load("model.onnx")
    result = onnxprune.optimize(model, "channels(ratio=0.3),nm(n=2,m=4)", calibration="calib.npz")
    onnxprune.save(result.model, "model.pruned.onnx")
    print(result.report)
"""

from __future__ import annotations

from onnxprune.api import OptimizeResult, optimize
from onnxprune.check import CheckResult, compare
from onnxprune.errors import OnnxPruneError
from onnxprune.ir.load import load
from onnxprune.ir.model import Model
from onnxprune.ir.save import save
from onnxprune.pipeline.base import Pass, PassContext, PassResult
from onnxprune.pipeline.manager import PassManager
from onnxprune.pipeline.registry import get_pass, register_pass, registered_passes
from onnxprune.pipeline.spec import parse_pipeline
from onnxprune.report import Report

__version__ = "0.1.0"

__all__ = [
    "CheckResult", "Model", "OnnxPruneError", "OptimizeResult", "Pass", "PassContext", "PassManager",
    "PassResult", "Report", "compare", "get_pass", "load", "optimize", "parse_pipeline", "register_pass",
    "registered_passes", "save", "__version__",
]

"""onnxprune: prune exported ONNX models.

Python API::

    import onnxprune
    model = onnxprune.load("model.onnx")
    result = onnxprune.optimize(model, "channels(ratio=0.3),nm(n=2,m=4)", calibration="calib.npz")
    onnxprune.save(result.model, "model.pruned.onnx")
    print(result.report)

    # or let the budgeted search pick the passes (what bare `onnxprune optimize model.onnx` runs)
    found = onnxprune.auto(model, calibration="calib.npz", budget="cos=0.99", target="ort-cpu")
    print(found.report.format(), found.spec)
"""

from __future__ import annotations

from onnxprune.api import OptimizeResult, optimize
from onnxprune.auto import AutoResult, auto
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

# ``onnxprune.auto`` is the search function; the module is importlib.import_module("onnxprune.auto")
__version__ = "0.1.0"

__all__ = [
    "AutoResult", "CheckResult", "Model", "OnnxPruneError", "OptimizeResult", "Pass", "PassContext", "PassManager",
    "PassResult", "Report", "auto", "compare", "get_pass", "load", "optimize", "parse_pipeline", "register_pass",
    "registered_passes", "save", "__version__",
]

"""Errors a user can cause.

Every error that bad input can trigger derives from :class:`OnnxPruneError`. The CLI turns any of
them into one line on stderr and exit code 2 (a traceback only with ``-v``). Messages name the file,
node, tensor, pass or option at fault and, where possible, what to do about it.
"""

from __future__ import annotations

from typing import NamedTuple


class OnnxPruneError(Exception):
    """Base class of every error a user can cause."""

    exit_code: int = 2


class ModelLoadError(OnnxPruneError):
    """The input file is missing, unreadable, not ONNX, truncated, or its external data is bad."""


class ModelSaveError(OnnxPruneError):
    """The output cannot be written (would overwrite the input, folder missing, ...)."""


class UnsupportedModelError(OnnxPruneError):
    """The model is valid ONNX but uses something this tool does not support (opset, op...)."""


class PipelineError(OnnxPruneError):
    """The pipeline spec or a recipe is malformed: unknown pass, unknown option, bad value."""


class PassError(OnnxPruneError):
    """A pass failed or its result did not validate; the message names the pass."""


class CalibrationError(PipelineError):
    """Calibration data is missing or does not match the model's inputs."""


class CheckError(OnnxPruneError):
    """A numerical comparison could not run or exceeded the requested tolerance."""


class NoGpuError(PassError):
    """TensorRT is importable but no GPU (or no CUDA driver) can build an engine."""


class Reason(NamedTuple):
    """Why something was skipped or blocked: a stable ``code`` for programs, a ``message`` for people.

    Code compares codes, never message text; ``str(reason)`` is the message.
    """

    code: str
    message: str

    def __str__(self) -> str:
        return self.message

"""Build a TensorRT engine with the real ``tensorrt`` Python API (TensorRT 10 and 11).

``import tensorrt`` is attempted only when an engine is asked for; where it fails the pass
raises with the equivalent ``trtexec`` command (:mod:`onnxprune.tensorrt.trtexec`). The builder
gets ``SPARSE_WEIGHTS`` (2:4 tactics on Ampere and newer), ``FP16`` when asked, and one
optimisation profile per dynamic input.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from onnxprune.errors import NoGpuError, PassError
from onnxprune.ir.save import atomic_write
from onnxprune.tensorrt.trtexec import (
    BuildSettings,
    parse_builder_log,
    parse_inspector,
    sparsity_summary,
)

log = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    import tensorrt as trt  # noqa: PLC0415 - optional dependency

    return trt


def _make_logger(trt: Any) -> Any:
    class CaptureLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        """Keeps (Sparsity) lines at any severity and warnings/errors."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            text = str(msg)
            level = int(severity)
            if "(Sparsity)" in text or level <= int(trt.ILogger.Severity.WARNING):
                self.lines.append(text)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(text)
            log.debug("TensorRT: %s", text)

    return CaptureLogger()


def _flag(enum: Any, name: str) -> int | None:
    member = getattr(enum, name, None)
    return None if member is None else 1 << int(member)


def build_engine(trt: Any, onnx_file: str, settings: BuildSettings) -> dict[str, Any]:
    """Build, write and inspect an engine with the TensorRT Python API.

    Returns:
        Stats: ``engine``, ``engine_bytes``, ``build_seconds``, ``tensorrt_version``, the
        profile, and :func:`sparsity_summary` of the builder log and inspector.

    Raises:
        PassError: no GPU, the parser rejects the model, or the build fails.
    """
    logger = _make_logger(trt)
    major = int(str(trt.__version__).split(".")[0])
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # noqa: BLE001 - CUDA initialisation failures surface here
        raise NoGpuError(f"tensorrt: cannot create a TensorRT builder (no usable GPU?): {exc}") from None
    if builder is None:
        raise NoGpuError("tensorrt: cannot create a TensorRT builder (no usable GPU?)")
    flags = 0
    if major < 10:
        flags |= _flag(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") or 0
    flags |= _flag(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") or 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_file):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise PassError("tensorrt: the ONNX parser rejected the model: " + " | ".join(" ".join(e.split()) for e in errs)[:600])
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_mb) << 20)
    if settings.sparse:
        sparse_flag = getattr(trt.BuilderFlag, "SPARSE_WEIGHTS", None)
        if sparse_flag is None:
            raise PassError(f"tensorrt: TensorRT {trt.__version__} has no BuilderFlag.SPARSE_WEIGHTS; use sparse=false")
        config.set_flag(sparse_flag)
    config.builder_optimization_level = int(settings.opt_level)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if settings.timing_cache:
        data = Path(settings.timing_cache).read_bytes() if Path(settings.timing_cache).is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    net_inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    dynamic = {n for n, s in net_inputs.items() if any(d < 0 for d in s)}
    used_profile = {n: p for n, p in settings.profile.items() if n in net_inputs}
    missing = sorted(dynamic - set(used_profile))
    if missing:
        raise PassError(f"tensorrt: no optimization-profile shapes for dynamic input(s) {', '.join(missing)}; "
                        "give shapes=name:min/opt/max")
    if used_profile:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in used_profile.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        detail = " | ".join(logger.errors[-3:]) or "see the TensorRT log (-v)"
        raise PassError(f"tensorrt: build_serialized_network failed: {detail[:600]}")
    blob = bytes(memoryview(serialized))
    with atomic_write(Path(settings.engine_path)) as f:
        f.write(blob)  # type: ignore[attr-defined]
    if settings.timing_cache:
        with atomic_write(Path(settings.timing_cache)) as f:
            f.write(bytes(memoryview(config.get_timing_cache().serialize())))  # type: ignore[attr-defined]
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(blob)
    inspector = engine.create_engine_inspector()
    info_text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    if settings.layer_info_path:
        with atomic_write(Path(settings.layer_info_path), "w") as f:
            f.write(info_text)  # type: ignore[attr-defined]
    layers = parse_inspector(info_text)
    log_facts = parse_builder_log(logger.lines)
    stats: dict[str, Any] = {
        "engine": settings.engine_path, "engine_bytes": len(blob), "build_seconds": round(seconds, 2),
        "tensorrt_version": str(trt.__version__), "engine_layers": len(layers),
        "profile": {n: [list(p) for p in v] for n, v in used_profile.items()},
        "layer_info": settings.layer_info_path,
    }
    stats.update(sparsity_summary(log_facts, layers))
    return stats


def missing_message(reason: str, command: str) -> str:
    return (f"tensorrt: {reason}; no engine was built. Install TensorRT 10/11 (pip install tensorrt) on a machine "
            f"with an NVIDIA GPU, or run the equivalent command: {command}")

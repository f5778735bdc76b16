"""Pass ``tensorrt``: build a TensorRT engine with sparse weights allowed and report what ran sparse.

The pass does not change the model (``modified=False``). It writes the current model to a
temporary ONNX file and builds a serialized engine through the ``tensorrt`` Python API
(TensorRT 10 and 11):

1. ``Builder`` with a capturing ``ILogger``; ``create_network`` with ``STRONGLY_TYPED`` where the
   flag exists (TensorRT 10.x; TensorRT 11 networks are always strongly typed, so the ONNX types
   decide the precision: run ``fp16`` first) and ``EXPLICIT_BATCH`` only before TensorRT 10;
2. ``OnnxParser.parse_from_file`` (parser errors become a :class:`PassError` naming the node);
3. ``create_builder_config``: ``set_memory_pool_limit(WORKSPACE, workspace_mb MiB)``,
   ``BuilderFlag.SPARSE_WEIGHTS`` when ``sparse``, ``builder_optimization_level``,
   ``ProfilingVerbosity.DETAILED``, a timing cache read from and written back to
   ``timing_cache``;
4. one optimization profile for the dynamic inputs, derived by
   :func:`onnxprune.trt_support.derive_profile` from the ONNX input dims and the ``shapes``
   option (defaults: batch axis 1/1/8, other dynamic axes 1/128/512);
5. ``build_serialized_network``; the engine is written atomically to ``engine``;
6. the engine inspector's JSON (``<engine>.layers.json``) and the builder log's ``(Sparsity)``
   lines are parsed into the eligible and the sparse-picked layers (stats), beside the ONNX-side
   eligibility from :mod:`onnxprune.analysis.tensorrt_eligibility`.

Without an importable ``tensorrt`` or without a usable GPU the pass raises :class:`PassError`
whose message holds the equivalent ``trtexec`` command, unless ``emit_trtexec=true``: then it
records the command in its stats, warns that no engine was built, and the pipeline goes on. The
command always names the ONNX file the pipeline saves (``ctx.options["output_path"]``, set by the
CLI) or else the file the model was loaded from.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxprune.errors import PassError, PipelineError
from onnxprune.model import Model, atomic_write, save
from onnxprune.pass_infra import Pass, PassContext, PassResult, register_pass
from onnxprune.trt_support import (
    BuildSettings,
    derive_profile,
    graph_input_dims,
    parse_builder_log,
    parse_inspector,
    parse_shapes,
    sparsity_summary,
    trtexec_command,
)

log = logging.getLogger(__name__)


@dataclass
class TensorRTOptions:
    """Options of ``tensorrt``."""

    engine: str = field(default="", metadata={
        "help": "engine file to write (default: the ONNX output path with .engine)"})
    sparse: bool = field(default=True, metadata={"help": "allow sparse tensor-core kernels (SPARSE_WEIGHTS)"})
    workspace_mb: int = field(default=4096, metadata={"help": "builder workspace pool limit in MiB", "min": 1})
    opt_level: int = field(default=3, metadata={"help": "builder optimization level", "min": 0, "max": 5})
    shapes: str = field(default="", metadata={
        "help": "optimization profile 'name:MINxDIMS/OPT/MAX;...', e.g. input_ids:1x16/8x128/32x512"})
    timing_cache: str = field(default="", metadata={"help": "timing cache file (read if present, then written)"})
    emit_trtexec: bool = field(default=False, metadata={
        "help": "record the equivalent trtexec command; without TensorRT warn instead of failing"})

    def validate(self) -> None:
        """Check the shapes syntax early."""
        try:
            parse_shapes(self.shapes)
        except PipelineError as exc:
            raise ValueError(str(exc).removeprefix("tensorrt: ")) from None


def resolve_paths(opts: TensorRTOptions, ctx: PassContext | None, model: Model) -> tuple[str, str]:
    """The ONNX path the command names and the engine path.

    Raises:
        PipelineError: no engine path given and none can be derived.
    """
    onnx_path = (ctx.options.get("output_path") if ctx is not None else None) or (
        str(model.path) if model.path is not None else "")
    engine = opts.engine
    if not engine:
        if not onnx_path:
            raise PipelineError("tensorrt: give engine=PATH (the model has no file path to derive one from)")
        p = Path(onnx_path)
        engine = str(p.with_name((p.name[:-5] if p.name.endswith(".onnx") else p.name) + ".engine"))
    return onnx_path or "model.onnx", engine


def build_settings(opts: TensorRTOptions, model: Model, ctx: PassContext | None = None) -> BuildSettings:
    """Everything a build needs (and the trtexec command shows), from options and the model."""
    onnx_path, engine = resolve_paths(opts, ctx, model)
    profile = derive_profile(graph_input_dims(model.proto), parse_shapes(opts.shapes))
    return BuildSettings(onnx_path=onnx_path, engine_path=engine, sparse=opts.sparse,
                         workspace_mb=opts.workspace_mb, opt_level=opts.opt_level, profile=profile,
                         timing_cache=opts.timing_cache or None, layer_info_path=engine + ".layers.json")


def _import_tensorrt() -> Any:
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
        raise PassError(f"tensorrt: cannot create a TensorRT builder (no usable GPU?): {exc}") from None
    if builder is None:
        raise PassError("tensorrt: cannot create a TensorRT builder (no usable GPU?)")
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


def _missing_message(reason: str, command: str) -> str:
    return (f"tensorrt: {reason}; no engine was built. Install TensorRT 10/11 (pip install tensorrt) on a machine "
            f"with an NVIDIA GPU, or run the equivalent command: {command}")


@register_pass
class TensorRTPass(Pass):
    """Build a TensorRT engine (sparse weights allowed) and report which layers ran sparse."""

    name = "tensorrt"
    description = "build a TensorRT engine with sparse weights allowed; report eligible and sparse layers"
    Options = TensorRTOptions
    preserves = ("weights",)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Build the engine; the model is left unchanged."""
        opts: TensorRTOptions = self.options
        settings = build_settings(opts, model, ctx)
        command = trtexec_command(settings)
        stats: dict[str, Any] = {"trtexec": command}
        try:
            from onnxprune.analysis.tensorrt_eligibility import inspect_tensorrt

            data = inspect_tensorrt(model)
            summary = data["summary"]
            stats["onnx_eligible"] = summary["eligible"]
            stats["onnx_eligible_flops_share"] = round(summary["eligible_flops_share"], 4)
            fp32 = sum(1 for e in data["layers"] if any(r.startswith("FP32 math") for r in e["reasons"]))
            if opts.sparse and fp32:
                ctx.warn(f"tensorrt: {fp32} GEMM layer(s) compute in FP32; TensorRT builds them FP32 with no sparse "
                         "kernels (strongly typed). Run the fp16 pass first")
        except Exception as exc:  # noqa: BLE001 - the analysis is informative only
            log.debug("eligibility analysis failed: %s", exc)
        try:
            trt = _import_tensorrt()
        except ImportError as exc:
            if opts.emit_trtexec:
                ctx.warn(f"tensorrt: no engine built (tensorrt not importable: {exc}); command: {command}")
                stats["built"] = False
                return PassResult(model, False, stats)
            raise PassError(_missing_message(f"the tensorrt Python package is not importable ({exc})", command)) from None
        try:
            with tempfile.TemporaryDirectory(prefix="onnxprune-trt-") as tmp:
                onnx_file = os.path.join(tmp, "model.onnx")
                save(model, onnx_file)
                stats.update(build_engine(trt, onnx_file, settings))
        except PassError as exc:
            if opts.emit_trtexec and "no usable GPU" in str(exc):
                ctx.warn(f"{exc}; command: {command}")
                stats["built"] = False
                return PassResult(model, False, stats)
            if "no usable GPU" in str(exc):
                raise PassError(_missing_message(str(exc).removeprefix("tensorrt: "), command)) from None
            raise
        stats["built"] = True
        return PassResult(model, False, stats)




def trtexec_for(model: Model, onnx_path: str | os.PathLike[str], passes: Any = ()) -> str:
    """The trtexec command for ``model`` saved at ``onnx_path``, using a ``tensorrt`` pass's options if given."""
    opts = next((p.options for p in passes if getattr(p, "name", "") == "tensorrt"), None) or TensorRTOptions()
    ctx = PassContext(options={"output_path": str(onnx_path)})
    return trtexec_command(build_settings(opts, model, ctx))


__all__ = ["TensorRTOptions", "TensorRTPass", "build_engine", "build_settings", "resolve_paths", "trtexec_for"]

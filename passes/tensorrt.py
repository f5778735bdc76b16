"""Pass ``tensorrt``: build a TensorRT engine with sparse weights allowed and report what ran sparse.

The pass does not change the model (``modified=False``) unless ``gemm_form=true``: then it
first rewrites every constant-weight MatMul into the 2-D ``Gemm(transB=1)`` form between
Reshapes (:mod:`onnxprune.tensorrt.gemm_form`; equal outputs to float rounding, dynamic axes
kept), and that model is what is built and saved. Whether the Gemm form helps TensorRT pick 2:4
tactics is version-dependent and not measured here; the README says what the sources say.
It writes the current model to a temporary ONNX file and builds a serialized engine through the
``tensorrt`` Python API (TensorRT 10 and 11):

1. ``Builder`` with a capturing ``ILogger``; ``create_network`` with ``STRONGLY_TYPED`` where the
   flag exists (TensorRT 10.x; TensorRT 11 networks are always strongly typed, so the ONNX types
   decide the precision: run ``fp16`` first) and ``EXPLICIT_BATCH`` only before TensorRT 10;
2. ``OnnxParser.parse_from_file`` (parser errors become a :class:`PassError` naming the node);
3. ``create_builder_config``: ``set_memory_pool_limit(WORKSPACE, workspace_mb MiB)``,
   ``BuilderFlag.SPARSE_WEIGHTS`` when ``sparse``, ``builder_optimization_level``,
   ``ProfilingVerbosity.DETAILED``, a timing cache read from and written back to
   ``timing_cache``;
4. one optimization profile for the dynamic inputs, derived by
   :func:`onnxprune.tensorrt.trtexec.derive_profile` from the ONNX input dims and the ``shapes``
   option (defaults: batch axis 1/1/8, other dynamic axes 1/128/512);
5. ``build_serialized_network``; the engine is written atomically to ``engine``;
6. the engine inspector's JSON (``<engine>.layers.json``) and the builder log's ``(Sparsity)``
   lines are parsed into the eligible and the sparse-picked layers (stats), beside the ONNX-side
   eligibility from :mod:`onnxprune.tensorrt.eligibility`.

Without an importable ``tensorrt`` or without a usable GPU the pass raises :class:`PassError`
whose message holds the equivalent ``trtexec`` command, unless ``emit_trtexec=true``: then it
records the command in its stats, warns that no engine was built, and the pipeline goes on. In
both cases the pass first writes the model it was given (after ``gemm_form``, if set) to
:func:`trtexec_onnx_path` of the engine (``out.engine`` -> ``out.trt.onnx``), and the command
names that file: it exists, and it holds the network this pass would have built, whatever runs
after the pass and whether or not the pipeline's output is written. The engine path defaults to
the ONNX file the pipeline saves (``ctx.options["output_path"]``, set by the CLI) or else the file
the model was loaded from, with ``.engine``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from onnxprune.errors import NoGpuError, OnnxPruneError, PassError, PipelineError
from onnxprune.ir.model import Model
from onnxprune.ir.save import save
from onnxprune.pipeline.base import Pass, PassContext, PassResult
from onnxprune.pipeline.registry import register_pass
from onnxprune.tensorrt.eligibility import inspect_tensorrt
from onnxprune.tensorrt.engine import build_engine, import_tensorrt, missing_message
from onnxprune.tensorrt.gemm_form import apply_gemm_form
from onnxprune.tensorrt.trtexec import (
    BuildSettings,
    derive_profile,
    graph_input_dims,
    parse_shapes,
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
    gemm_form: bool = field(default=False, metadata={
        "help": "rewrite constant-weight MatMuls as Reshape > Gemm(transB=1) > Reshape first (changes the model)"})

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


def trtexec_onnx_path(engine: str) -> str:
    """Where the pass writes the ONNX a ``trtexec`` command builds from when it built no engine:
    the engine path with ``.trt.onnx`` for its suffix (``out.engine`` -> ``out.trt.onnx``)."""
    p = Path(engine)
    return str(p.with_name((p.stem if p.suffix else p.name) + ".trt.onnx"))


def _unbuilt_command(model: Model, settings: BuildSettings, stats: dict[str, Any]) -> str:
    """No engine was built: write ``model`` where the trtexec command reads it; return the command.

    Raises:
        PassError: the file cannot be written (or would be the input model).
    """
    onnx_file = trtexec_onnx_path(settings.engine_path)
    try:
        save(model, onnx_file)
    except OnnxPruneError as exc:
        raise PassError(f"tensorrt: no engine was built, and the model for trtexec could not be written: {exc}") \
            from None
    command = trtexec_command(replace(settings, onnx_path=onnx_file))
    stats.update(trtexec=command, trtexec_onnx=onnx_file)
    return command


def build_settings(opts: TensorRTOptions, model: Model, ctx: PassContext | None = None) -> BuildSettings:
    """Everything a build needs (and the trtexec command shows), from options and the model."""
    onnx_path, engine = resolve_paths(opts, ctx, model)
    profile = derive_profile(graph_input_dims(model.proto), parse_shapes(opts.shapes))
    return BuildSettings(onnx_path=onnx_path, engine_path=engine, sparse=opts.sparse,
                         workspace_mb=opts.workspace_mb, opt_level=opts.opt_level, profile=profile,
                         timing_cache=opts.timing_cache or None, layer_info_path=engine + ".layers.json")


@register_pass
class TensorRTPass(Pass):
    """Build a TensorRT engine (sparse weights allowed) and report which layers ran sparse."""

    name = "tensorrt"
    description = "build a TensorRT engine with sparse weights allowed; report eligible and sparse layers"
    Options = TensorRTOptions
    preserves = ()  # only gemm_form modifies the model, and it moves weights and nodes

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Build the engine; the model is left unchanged."""
        opts: TensorRTOptions = self.options
        settings = build_settings(opts, model, ctx)
        command = trtexec_command(settings)
        stats: dict[str, Any] = {"trtexec": command}
        modified = False
        if opts.gemm_form:
            gf = apply_gemm_form(model)
            gf["skipped"] = dict(Counter(gf["skipped"].values()))  # reason -> count
            stats["gemm_form"] = gf
            modified = gf["rewritten"] > 0
        try:
            data = inspect_tensorrt(model)
            summary = data["summary"]
            stats["onnx_eligible"] = summary["eligible"]
            stats["onnx_eligible_flops_share"] = round(summary["eligible_flops_share"], 4)
            fp32 = sum(1 for e in data["layers"] if "fp32_math" in e["reason_codes"])
            if opts.sparse and fp32:
                ctx.warn(f"tensorrt: {fp32} GEMM layer(s) compute in FP32; TensorRT builds them FP32 with no sparse "
                         "kernels (strongly typed). Run the fp16 pass first")
        except Exception as exc:  # noqa: BLE001 - the analysis is informative only
            log.debug("eligibility analysis failed: %s", exc)
        try:
            trt = import_tensorrt()
        except ImportError as exc:
            command = _unbuilt_command(model, settings, stats)
            if opts.emit_trtexec:
                ctx.warn(f"tensorrt: no engine built (tensorrt not importable: {exc}); wrote "
                         f"{stats['trtexec_onnx']} for: {command}")
                stats["built"] = False
                return PassResult(model, modified, stats)
            raise PassError(missing_message(f"the tensorrt Python package is not importable ({exc})",
                                            f"{command} (wrote {stats['trtexec_onnx']} for it)")) from None
        try:
            with tempfile.TemporaryDirectory(prefix="onnxprune-trt-") as tmp:
                onnx_file = os.path.join(tmp, "model.onnx")
                save(model, onnx_file)
                stats.update(build_engine(trt, onnx_file, settings))
        except NoGpuError as exc:
            command = _unbuilt_command(model, settings, stats)
            if opts.emit_trtexec:
                ctx.warn(f"{exc}; wrote {stats['trtexec_onnx']} for: {command}")
                stats["built"] = False
                return PassResult(model, modified, stats)
            raise PassError(missing_message(str(exc).removeprefix("tensorrt: "),
                                            f"{command} (wrote {stats['trtexec_onnx']} for it)")) from None
        stats["built"] = True
        return PassResult(model, modified, stats)


def trtexec_for(model: Model, onnx_path: str | os.PathLike[str], passes: Any = ()) -> str:
    """The trtexec command for ``model`` saved at ``onnx_path``, using a ``tensorrt`` pass's options if given."""
    opts = next((p.options for p in passes if getattr(p, "name", "") == "tensorrt"), None) or TensorRTOptions()
    ctx = PassContext(options={"output_path": str(onnx_path)})
    return trtexec_command(build_settings(opts, model, ctx))

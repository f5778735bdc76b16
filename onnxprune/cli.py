"""Command line: ``onnxprune optimize|inspect|check|bench|passes|demo``.

Every user error becomes one line on stderr and exit code 2 (a traceback only with ``-v``);
``check`` exits 1 when given tolerances are exceeded, and whatever the tolerances when an output
changed shape or holds NaN/Inf the reference does not (``optimize --check`` then writes nothing);
an unexpected internal error prints one line and exits 3. ``optimize`` writes its output (and
report) atomically and only after every pass and the optional check succeeded, so a failed run
leaves no output file behind, and it never writes over its input unless ``--inplace``; with
``--check --atol/--rtol`` a result outside the tolerance exits 1 and writes only the report.
``check`` and ``optimize --check`` end with a verdict line (:func:`onnxprune.check.verdict`):
``kept``, or ``degraded`` / ``broken`` against ``--min-cos`` / ``--min-top1`` (defaults 0.99 each,
``none`` turns a gate off), which exits 1 (``optimize`` then writes no model; its report's
``failures`` say why). ``--atol``, ``--rtol``, ``--min-cos``, ``--min-top1``, ``--pool`` and
``--check-inputs`` without ``--check`` are an error. ``bench`` times models on ONNX Runtime CPU
(:mod:`onnxprune.bench`); ``optimize --bench`` times the input against the output.
``--quiet`` and ``--json`` also silence progress bars (:mod:`onnxprune.progress`); ``-v``/``-q``
are accepted before or after the command. A closed stdout (``| head``) ends the command quietly
with exit code 141 (128 + SIGPIPE, what a shell reports for a pipe writer it stopped).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from onnxprune.errors import OnnxPruneError

log = logging.getLogger("onnxprune")

EXIT_USAGE = 2
EXIT_CHECK_FAILED = 1
EXIT_INTERNAL = 3
#: The reader of stdout went away (``| head``): 128 + SIGPIPE, what a shell shows for a killed pipe writer.
EXIT_BROKEN_PIPE = 141

#: Passes the demo runs, in order; those not registered in this build are skipped.
DEMO_PIPELINE = ["cleanup", "channels(ratio=0.3,round_to=8,criterion=activation)",
                 "nm(n=2,m=4,criterion=sparsegpt)"]
#: The same structure chosen without calibration data, shown for comparison.
DEMO_BASELINE = ["cleanup", "channels(ratio=0.3,round_to=8)", "nm(n=2,m=4)"]
DEMO_CALIB_SAMPLES = 32


def _parse_dims(items: Sequence[str] | None) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in items or []:
        if "=" not in item:
            raise OnnxPruneError(f"--dim expects name=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            dims[k.strip()] = int(v)
        except ValueError:
            raise OnnxPruneError(f"--dim {k}: {v!r} is not an integer") from None
        if dims[k.strip()] <= 0:
            raise OnnxPruneError(f"--dim {k}: must be positive")
    return dims


#: Marks a gate flag that was not given (None means ``none``: the gate is off).
_DEFAULT: Any = object()


def _gate(text: str) -> float | None:
    """``--min-cos`` / ``--min-top1`` value: a number in [0, 1], or ``none`` (no gate)."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number in [0, 1] or 'none', got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {v:g}")
    return v


def _require_check(args: argparse.Namespace) -> None:
    """Options that only act on ``--check`` are an error without it (never silently ignored)."""
    given = [flag for flag, attr in (("--atol", "atol"), ("--rtol", "rtol"), ("--min-cos", "min_cos"),
                                     ("--min-top1", "min_top1"), ("--pool", "pool"),
                                     ("--check-inputs", "check_inputs"))
             if getattr(args, attr, None) is not None and getattr(args, attr) is not _DEFAULT]
    if given and not args.check:
        raise OnnxPruneError(f"{', '.join(given)} only act(s) on the check: add --check")


def _gates(args: argparse.Namespace) -> tuple[float | None, float | None]:
    """The verdict gates: the flags' values, the defaults when not given, None for ``none``."""
    from onnxprune.check import DEFAULT_MIN_COS, DEFAULT_MIN_TOP1

    min_cos = DEFAULT_MIN_COS if args.min_cos is _DEFAULT else args.min_cos
    min_top1 = DEFAULT_MIN_TOP1 if args.min_top1 is _DEFAULT else args.min_top1
    return min_cos, min_top1


def _write_text_atomic(path: Path, text: str) -> None:
    from onnxprune.ir.save import atomic_write

    with atomic_write(path, "w") as f:
        f.write(text)  # type: ignore[attr-defined]


def _write_report(path: Path, report: Any) -> None:
    """Write the report: HTML when the name ends in .html/.htm, else JSON."""
    if path.suffix.lower() in (".html", ".htm"):
        from onnxprune.report_html import render_html

        _write_text_atomic(path, render_html(report))
    else:
        _write_text_atomic(path, report.to_json())


def _check_report_path(path: Path, inp: Path, out: Path) -> None:
    for other, what in ((inp, "the input model"), (out, "the output model"),
                        (out.parent / (out.name + ".data"), "the output's external data")):
        if path.resolve() == other.resolve() or (path.exists() and other.exists() and os.path.samefile(path, other)):
            raise OnnxPruneError(f"--report {path}: is {what}; choose another file")
    if path.is_dir():
        raise OnnxPruneError(f"--report {path}: is a directory")
    if not path.parent.exists():
        raise OnnxPruneError(f"--report {path}: folder {path.parent} does not exist")


def _default_output(inp: Path) -> Path:
    name = inp.name[:-5] if inp.name.endswith(".onnx") else inp.name
    return inp.parent / f"{name}.pruned.onnx"


# ---------------------------------------------------------------------- commands
def cmd_optimize(args: argparse.Namespace) -> int:
    """Run a pipeline on a model and save the result (replaced weights spill beside the output)."""
    from onnxprune.ir.scratch import scratch_near

    with scratch_near(Path(args.output or args.model).resolve().parent):
        return _optimize(args)


def _optimize(args: argparse.Namespace) -> int:
    import onnxprune
    from onnxprune.pipeline.spec import load_recipe, parse_pipeline
    from onnxprune.summary import file_size

    inp = Path(args.model)
    out = Path(args.output) if args.output else (inp if args.inplace else _default_output(inp))
    if args.passes and args.recipe:
        raise OnnxPruneError("give either --passes or --recipe, not both")
    overrides: dict[str, Any] = {}
    if args.recipe:
        passes, overrides = load_recipe(args.recipe)
    elif args.passes:
        passes = parse_pipeline(args.passes)
    else:
        passes = None  # no pipeline: the budgeted search (onnxprune.auto) picks one
    if out.exists() and out.is_dir():
        raise OnnxPruneError(f"{out}: is a directory")
    if not args.inplace and inp.exists() and out.exists() and os.path.samefile(inp, out):
        raise OnnxPruneError(f"{out}: refusing to write over the input model (use --inplace)")
    if not out.parent.exists():
        raise OnnxPruneError(f"{out.parent}: output folder does not exist")
    _require_check(args)
    if args.report:
        _check_report_path(Path(args.report), inp, out)
    if passes is None:
        return _run_auto(args, inp, out)
    if args.calib_limit is not None and not args.calib:
        raise OnnxPruneError("--calib-limit needs --calib")
    if getattr(args, "emit_trtexec", False):  # a missing TensorRT then warns instead of failing
        for p in passes:
            if p.name == "tensorrt":
                p.options.emit_trtexec = True
    model = onnxprune.load(inp)
    dims = _parse_dims(args.dim)
    from onnxprune.ir.io import check_dim_names

    check_dim_names(dims, [(str(inp), model.graph)])
    result = onnxprune.optimize(
        model, passes, calibration=args.calib, calibration_batch=args.calib_batch, calibration_limit=args.calib_limit,
        check=args.check,
        check_inputs=args.check_inputs, check_dims=dims, check_pool=args.pool, recipe_overrides=overrides, inplace=True,
        verify=not args.no_verify, input_path=inp,
        options={"output_path": str(out)} | {k: v for k in ("max_memory", "executor")
                                             if (v := getattr(args, k, None)) is not None},
        per_layer=bool(args.report or args.json),  # JSON and HTML reports carry the per-weight rows
    )
    report = result.report
    if report.check and report.check.problems():  # changed shapes, NaN/Inf: whatever the tolerances
        report.failures += [f"check failed: {problem}" for problem in report.check.problems()]
        report.failures.append(f"{out} was not written")
        _emit_report(args, report)
        for problem in report.check.problems():
            print(f"error: check failed: {problem}", file=sys.stderr)
        print(f"error: {out} was not written", file=sys.stderr)
        return EXIT_CHECK_FAILED
    if report.check and (args.atol is not None or args.rtol is not None) and not report.check.within(args.atol,
                                                                                                   args.rtol):
        # a result outside the tolerance is not written (a build script must not pick it up)
        report.failures.append(f"check exceeded tolerance (atol={args.atol}, rtol={args.rtol}): max abs "
                               f"{max((o.max_abs for o in report.check.outputs), default=0.0):.3g}, max rel "
                               f"{max((o.max_rel for o in report.check.outputs), default=0.0):.3g}; "
                               f"{out} was not written")
        _emit_report(args, report)
        print(f"error: check exceeded tolerance (atol={args.atol}, rtol={args.rtol}); {out} was not written",
              file=sys.stderr)
        return EXIT_CHECK_FAILED
    judged = None
    if report.check:  # the verdict gates (--min-cos / --min-top1): a degraded or broken result is not written
        from onnxprune.check import verdict

        judged = verdict(report.check, *_gates(args))
        if not judged.kept:
            report.failures += [f"check {judged.status}: {f}" for f in judged.failures] + [f"{out} was not written"]
            _emit_report(args, report)
            print(f"error: {judged.line}", file=sys.stderr)
            print(f"error: {out} was not written (to accept it, loosen --min-cos / --min-top1, or give 'none')",
                  file=sys.stderr)
            return EXIT_CHECK_FAILED
    sparse_stats: dict[str, list[str]] = {}
    onnxprune.save(result.model, out, inplace=args.inplace, sparse_initializers=args.sparse_storage,
                   sparse_threshold=args.sparse_threshold, sparse_stats=sparse_stats)
    if args.sparse_storage:
        report.warnings.extend(_sparse_storage_notes(sparse_stats, args.sparse_threshold))
    report.output_path = str(out)
    report.after.file_size = file_size(out)
    if getattr(args, "emit_trtexec", False):
        from onnxprune.passes.tensorrt import trtexec_for

        print(trtexec_for(result.model, out, passes), file=sys.stderr if args.json else sys.stdout)
    _emit_report(args, report)
    side = sys.stderr if args.json else sys.stdout  # stdout stays pure JSON with --json
    if judged is not None and not args.quiet:
        print(judged.line, file=side)
    if args.bench:
        print(_bench_text(inp, out, args.check_inputs, dims, getattr(args, "threads", None), args.bench_runs),
              file=side)
    if not args.json and not args.quiet:
        print(f"\nwrote {out}")
    return 0


def _run_auto(args: argparse.Namespace, inp: Path, out: Path) -> int:
    """``optimize`` without ``--passes``: the budgeted search, then save, report and the reproducing spec."""
    import json

    import onnxprune
    from onnxprune.auto import auto, print_log
    from onnxprune.summary import file_size

    model = onnxprune.load(inp)
    quiet = args.quiet or args.json
    result = auto(model, calibration=args.calib, calibration_batch=args.calib_batch, budget=args.budget,
                  target=args.target, time_limit=args.time_limit, threads=args.threads, tokens=args.tokens,
                  dims=_parse_dims(args.dim), latency_batch=args.latency_batch,
                  log=None if quiet else print_log)
    onnxprune.save(result.model, out, inplace=args.inplace, sparse_initializers=args.sparse_storage,
                   sparse_threshold=args.sparse_threshold)
    data = result.report.to_dict()
    data["output"] = {"path": str(out), "size": file_size(out)}
    data["pipeline"] = result.pipeline_report.to_dict() if result.pipeline_report is not None else None
    trtexec = None
    if args.target == "tensorrt":
        from onnxprune.passes.tensorrt import trtexec_for

        trtexec = trtexec_for(result.model, out)
        data["trtexec"] = trtexec
    if args.report and Path(args.report).suffix.lower() in (".html", ".htm"):
        _write_report(Path(args.report), result.pipeline_report)  # the chosen pipeline's page; JSON has the search
    elif args.report:
        _write_text_atomic(Path(args.report), json.dumps(data, indent=2, default=str) + "\n")
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    elif not args.quiet:
        print(result.report.format())
        if trtexec:
            print(f"\nTensorRT is not run here; build the engine with:\n  {trtexec}")
        print(f"\nwrote {out}" + (f" and report {args.report}" if args.report else ""))
    return 0


def _sparse_storage_notes(stats: dict[str, list[str]], threshold: float) -> list[str]:
    """What ``--sparse-storage`` could not do, for the report (nothing when it shrank every candidate)."""
    sparse, dense = stats.get("sparse", []), stats.get("not_smaller", [])
    notes = []
    if dense:
        notes.append(f"--sparse-storage: {len(dense)} weight(s) with >= {threshold:.0%} zeros kept dense: sparse "
                     "storage needs an int64 index per non-zero, so it is only smaller above ~2/3 zeros (fp32) "
                     "or ~4/5 (fp16); 2:4 (50% zeros) cannot shrink")
    if not sparse:
        notes.append("--sparse-storage: no weight was stored sparse; the file is as large as without it")
    return notes


def _emit_report(args: argparse.Namespace, report: Any) -> None:
    """Write ``--report``, print the report (JSON with ``--json``, tables unless ``--quiet``) and the
    report's path (on stderr with ``--json`` or when the run failed)."""
    if args.report:
        _write_report(Path(args.report), report)
    if args.json:
        print(report.to_json())
    elif not args.quiet:
        print(report.format())
    if args.report and not args.quiet:  # stdout stays pure JSON with --json
        print(f"wrote report {args.report}", file=sys.stderr if args.json or report.failures else sys.stdout)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print what a model holds (:mod:`onnxprune.inspection`)."""
    import onnxprune
    from onnxprune.inspection import InspectRequest, inspect_document, inspect_text

    nm = None
    if args.nm:
        try:
            n, m = (int(x) for x in args.nm.split(":"))
        except ValueError:
            raise OnnxPruneError(f"--nm expects N:M such as 2:4, got {args.nm!r}") from None
        nm = (n, m)
    req = InspectRequest(nm=nm, groups=args.groups, tensorrt=args.tensorrt, dims=_parse_dims(args.dim))
    model = onnxprune.load(args.model)
    if args.json:
        print(json.dumps(inspect_document(model, str(args.model), req), indent=2, default=str))
    else:
        print(inspect_text(model, str(args.model), req))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Compare two models on ONNX Runtime CPU."""
    from onnxprune.check import compare, verdict
    from onnxprune.ir.io import check_dim_names
    from onnxprune.ir.load import load

    a, b = load(args.reference), load(args.candidate)
    dims = _parse_dims(args.dim)
    check_dim_names(dims, [(args.reference, a.graph), (args.candidate, b.graph)])
    result = compare(a, b, feeds=args.inputs, dims=dims, seed=args.seed, pool=args.pool)
    judged = verdict(result, *_gates(args))
    if args.json:
        print(json.dumps({**result.to_dict(), "verdict": judged.to_dict()}, indent=2))
    else:
        print(result.format())
        print(judged.line)
    for problem in result.problems():  # changed shapes, NaN/Inf: whatever the tolerances
        print(f"error: check failed: {problem}", file=sys.stderr)
    if result.problems():
        return EXIT_CHECK_FAILED
    if (args.atol is not None or args.rtol is not None) and not result.within(args.atol, args.rtol):
        print(f"error: outputs differ beyond atol={args.atol} rtol={args.rtol}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    if not judged.kept:  # degraded or broken: exit 1 (EXIT_CHECK_FAILED)
        print(f"error: {judged.line}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def _bench_feeds(reference: Any, inputs: str | None, dims: dict[str, int]) -> tuple[dict[str, Any], bool]:
    """The bench inputs: ``inputs`` (.npz), else synthesised for ``reference``; and whether synthesised."""
    from onnxprune.check import load_feeds, make_session, synthesize_feeds

    if inputs:
        return load_feeds(inputs), False
    return synthesize_feeds(make_session(reference), reference, dims)[0], True


def _bench_lines(labels: Sequence[str], timings: Sequence[Any], feeds: dict[str, Any], synthesized: bool,
                 threads: int | None, warmup: int) -> list[str]:
    """The bench table: where the inputs came from, one line per model, the ratio."""
    from onnxprune.bench import speedup

    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
    runs = timings[0].runs if timings else 0
    lines = [f"inputs: {'RANDOM (synthesised from the graph)' if synthesized else 'given'}: {shapes}; "
             f"threads {threads if threads else f'ONNX Runtime default ({os.cpu_count()} cores)'}; "
             f"{warmup} warm-up + {runs} interleaved runs each"]
    width = max(len(x) for x in labels)
    names = [_BENCH_NAMES[i] if i < len(_BENCH_NAMES) else str(i + 1) for i in range(len(timings))]
    lines += [f"  {n} {lab:<{width}}  {t.format()}" for n, lab, t in zip(names, labels, timings)]
    for n, t in zip(names[1:], timings[1:]):
        r = speedup(timings[0], t)
        lines.append(f"  speedup A/{n} {r:.3f}x ({f'{n} faster' if r > 1 else f'{n} slower' if r < 1 else 'equal'}; "
                     "median over median)")
    return lines


#: Letters naming the models of ``bench`` (the first is the reference A).
_BENCH_NAMES = "ABCDEFGH"


def _bench_text(inp: Path, out: Path, inputs: str | None, dims: dict[str, int], threads: int | None,
                runs: int) -> str:
    """``optimize --bench``: the input against the output, on the check inputs or synthesised ones."""
    import onnxprune
    from onnxprune.bench import measure

    reference = onnxprune.load(inp)
    feeds, synthesized = _bench_feeds(reference, inputs, dims)
    timings = measure([inp, out], feeds, threads=threads, runs=runs)  # paths: ONNX Runtime reads the files
    return "\n".join(["", "latency (ONNX Runtime CPU), A = input, B = output"]
                     + _bench_lines([str(inp), str(out)], timings, feeds, synthesized, threads, 3))


def cmd_bench(args: argparse.Namespace) -> int:
    """Time one or two models on ONNX Runtime CPU (warm-up, interleaved runs, median and IQR)."""
    import onnxprune
    from onnxprune.bench import measure, speedup
    from onnxprune.ir.io import check_dim_names

    models = [onnxprune.load(m) for m in args.models]
    dims = _parse_dims(args.dim)
    check_dim_names(dims, [(p, m.graph) for p, m in zip(args.models, models)])
    feeds, synthesized = _bench_feeds(models[0], args.inputs, dims)
    timings = measure(args.models, feeds, threads=args.threads, warmup=args.warmup, runs=args.runs,
                      max_seconds=args.max_seconds)
    if args.json:
        doc: dict[str, Any] = {"inputs": {k: list(v.shape) for k, v in feeds.items()},
                               "synthesized_inputs": synthesized, "threads": args.threads, "warmup": args.warmup,
                               "models": [{"path": p, **t.to_dict()} for p, t in zip(args.models, timings)]}
        if len(timings) == 2:
            doc["speedup"] = speedup(timings[0], timings[1])
        doc["speedup_vs_first"] = [speedup(timings[0], t) for t in timings]
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(_bench_lines(args.models, timings, feeds, synthesized, args.threads, args.warmup)))
    return 0


#: What ``onnxprune passes`` says about per-layer overrides.
OVERRIDES_HELP = ("per-layer overrides: yes, a recipe's [pass.layers] table: regex (re.search on initializer "
                  "and consuming-node names) = {option = value, ...}, or {skip = true}; a regex matching no "
                  "weight is an error")


def _option_line(o: Any) -> str:
    """One option, always in one form: ``name  type  default  help [one of: ...] [bounds]``."""
    kind = "choice" if o.choices else o.type_name
    extra = f" (one of: {', '.join(map(str, o.choices))})" if o.choices else ""
    if o.bounds:
        extra += " (" + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in o.bounds.items()) + ")"
    return f"    {o.name:<18} {kind:<12} default {o.default!r:<12} {o.help}{extra}"


def cmd_passes(args: argparse.Namespace) -> int:
    """List registered passes and their options."""
    from onnxprune.pipeline.options import option_specs
    from onnxprune.pipeline.registry import registered_passes

    passes = registered_passes()
    if args.json:
        doc = {name: {"description": cls.description, "layer_overrides": bool(cls.layer_overrides),
                      "options": [{"name": o.name, "type": o.type_name, "default": o.default, "help": o.help,
                                   "choices": list(o.choices) if o.choices else None, "bounds": o.bounds}
                                  for o in option_specs(cls.Options)]}
               for name, cls in passes.items()}
        print(json.dumps(doc, indent=2, default=str))
        return 0
    for name, cls in passes.items():
        print(f"{name}: {cls.description}")
        for o in option_specs(cls.Options):
            print(_option_line(o))
        print(f"    {OVERRIDES_HELP if cls.layer_overrides else 'per-layer overrides: no'}")
    return 0


def demo_pipeline(items: Sequence[str] = DEMO_PIPELINE) -> str:
    """The demo's pipeline: the passes of ``items`` this build registers."""
    from onnxprune.pipeline.registry import registered_passes
    from onnxprune.pipeline.spec import parse_pipeline_spec

    have = registered_passes()
    return ",".join(p for p in items if parse_pipeline_spec(p)[0][0] in have)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run a representative pipeline on the bundled demo model."""
    data = resources.files("onnxprune") / "data"
    src = Path(str(data / "demo_cnn.onnx"))
    feeds_path = Path(str(data / "demo_cnn_inputs.npz"))
    if not src.is_file():
        raise OnnxPruneError(f"bundled demo model missing at {src}; reinstall onnxprune")
    if not args.output_dir:  # a temporary folder, removed again: the demo leaves nothing behind
        with tempfile.TemporaryDirectory(prefix="onnxprune-demo-") as tmp:
            return _run_demo(src, feeds_path, Path(tmp), keep=False)
    outdir = Path(args.output_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    return _run_demo(src, feeds_path, outdir, keep=True)


def _run_demo(src: Path, feeds_path: Path, outdir: Path, *, keep: bool) -> int:
    """The demo's work, writing into ``outdir`` (removed afterwards unless ``keep``)."""
    import numpy as np

    import onnxprune
    from onnxprune.check import load_feeds
    from onnxprune.summary import file_size

    pipeline = demo_pipeline()
    model = onnxprune.load(src)
    feeds = load_feeds(feeds_path) if feeds_path.is_file() else None
    # calibration samples drawn apart from the check inputs (different seed): a held-out check
    rng = np.random.default_rng(1)
    calib = [{"input": rng.standard_normal((8, 3, 32, 32)).astype(np.float32)}
             for _ in range(DEMO_CALIB_SAMPLES // 8)]
    print(f"demo model: {src.name}  pipeline: {pipeline}")
    print(f"calibration: {DEMO_CALIB_SAMPLES} random samples; check: {len(next(iter(feeds.values()))) if feeds else 1} "
          "other samples\n")
    result = onnxprune.optimize(model, pipeline, calibration=calib, check=True, check_inputs=feeds, input_path=src)
    out = outdir / "demo_cnn.pruned.onnx"
    onnxprune.save(result.model, out)
    result.report.output_path = str(out)
    result.report.after.file_size = file_size(out)
    print(result.report.format())
    baseline = demo_pipeline(DEMO_BASELINE)
    plain = onnxprune.optimize(model, baseline, check=True, check_inputs=feeds, input_path=src)
    if result.report.check and plain.report.check:
        a, b = result.report.check.outputs[0], plain.report.check.outputs[0]
        print(f"\nsame structure without calibration ({baseline}):")
        print(f"  cosine to the dense model {b.cosine:.4f} (calibration-aware: {a.cosine:.4f}), "
              f"max rel. error {b.max_rel:.3g} (calibration-aware: {a.max_rel:.3g})")
    print("\nnote: the demo model has random weights, so its drift says little about a trained model; "
          "structural\nremoval itself is exact (the tests compare every removal with its masked twin); "
          "`--check` measures\nthe drift on your own model and inputs.")
    print(f"\nwrote {out}" if keep else "\n(the output went to a temporary folder, now removed; "
          "`onnxprune demo -o DIR` keeps it)")
    return 0


# ---------------------------------------------------------------------- parser
def _add_gate_args(parser: argparse.ArgumentParser, prefix: str) -> None:
    """``--min-cos`` / ``--min-top1``: the verdict gates (onnxprune.check.verdict)."""
    from onnxprune.check import DEFAULT_MIN_COS, DEFAULT_MIN_TOP1

    parser.add_argument("--min-cos", type=_gate, default=_DEFAULT, metavar="C",
                        help=f"{prefix}verdict 'kept' needs every output's cosine >= C (default {DEFAULT_MIN_COS}; "
                             "'none' turns the gate off); otherwise 'degraded' or 'broken' and exit 1")
    parser.add_argument("--min-top1", type=_gate, default=_DEFAULT, metavar="T",
                        help=f"{prefix}verdict 'kept' needs top-1 agreement >= T on logit-like outputs "
                             f"(default {DEFAULT_MIN_TOP1}; 'none' turns it off)")


def _version() -> str:
    import onnxprune

    return str(onnxprune.__version__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(prog="onnxprune", description="Prune exported ONNX models.")
    p.add_argument("--version", action="version", version=f"onnxprune {_version()}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details and show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (and --json output)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    # -v/-q are accepted after the command too (``onnxprune optimize X -q``)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log details and show tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="print nothing but errors (and --json output)")

    o = sub.add_parser("optimize", help="run a pipeline of passes on a model", parents=[common])
    o.add_argument("model", help="input .onnx")
    o.add_argument("-o", "--output", help="output .onnx (default IN.pruned.onnx beside the input)")
    o.add_argument("--passes", help="pipeline, e.g. 'channels(ratio=0.3),nm(n=2,m=4)'")
    o.add_argument("--recipe", help="TOML recipe with [[pass]] tables")
    o.add_argument("--calib", help="calibration data .npz (arrays named after the model inputs)")
    o.add_argument("--calib-batch", type=int, default=None, help="calibration batch size")
    o.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory for the calibration statistics of one block of layers (e.g. 6G; default 25%% of "
                        "RAM); larger models are calibrated in more blocks")
    o.add_argument("--executor", default=None, metavar="ray[:ADDRESS]",
                   help="run the per-layer calibration work (statistics per shard, per-layer solves) as Ray tasks: "
                        "'ray' (local instance), 'ray:auto' or 'ray:HOST:PORT' (a cluster); needs onnxprune[distributed]")
    o.add_argument("--calib-limit", type=int, default=None, metavar="N",
                   help="use only the first N calibration samples (the automatic search's reproducing command "
                        "passes this so its held-out samples stay unseen)")
    o.add_argument("--budget", default=None, metavar="SPEC",
                   help="without --passes: what the result must keep per output on held-out samples, e.g. "
                        "'cos=0.98' or 'top1=0.995' or 'cos=0.99,atol=0.05' (default cos=0.99,top1=0.99)")
    o.add_argument("--target", default="ort-cpu", choices=["ort-cpu", "tensorrt"],
                   help="without --passes: ort-cpu picks by latency measured with ONNX Runtime here; tensorrt "
                        "adds 2:4 where the measured gain pays, then fp16, and prints the trtexec command")
    o.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="without --passes: stop the search after S seconds with the best model found")
    o.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads for latency measurements (default: ONNX Runtime's)")
    o.add_argument("--latency-batch", type=int, default=None, metavar="N",
                   help="without --passes: samples per timed run, the batch you deploy at (default: the held-out "
                        "batch; a model faster at batch 16 can be slower at batch 1)")
    o.add_argument("--tokens", type=int, default=512,
                   help="--target tensorrt: rows per GEMM (batch x sequence) at which 2:4 must pay")
    o.add_argument("--check", action="store_true", help="compare the result with the input on ONNX Runtime CPU")
    o.add_argument("--check-inputs", help=".npz inputs for --check (random when absent)")
    o.add_argument("--dim", action="append", metavar="NAME=VALUE", help="dynamic dim value for random inputs")
    o.add_argument("--atol", type=float, help="with --check: exit 1 (and write no model) if max abs error exceeds this")
    o.add_argument("--rtol", type=float, help="with --check: exit 1 (and write no model) if max rel error exceeds this")
    _add_gate_args(o, "with --check: ")
    o.add_argument("--pool", choices=["mean"], help="with --check: also compare mean-pooled [B,S,H] outputs "
                   "(sentence embeddings; padding excluded via the *mask* input); the cosine gate then uses them")
    o.add_argument("--bench", action="store_true",
                   help="after the run, time the input against the output on ONNX Runtime CPU (as `onnxprune "
                        "bench`; --threads, --check-inputs and --dim apply)")
    o.add_argument("--bench-runs", type=int, default=15, metavar="N", help="with --bench: timed runs of each model")
    o.add_argument("--report", help="write the report here: HTML (per-layer chart) if it ends in .html, else JSON")
    o.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    o.add_argument("--inplace", action="store_true", help="allow writing over the input model")
    o.add_argument("--sparse-storage", action="store_true",
                   help="store sparse weights as ONNX sparse_initializer (smaller file; ONNX Runtime "
                        "densifies them at load; TensorRT's parser ignores them - do not use for TensorRT)")
    o.add_argument("--sparse-threshold", type=float, default=0.5, help="min share of zeros for --sparse-storage")
    o.add_argument("--no-verify", action="store_true",
                   help="skip checker/shape inference between passes and the final ONNX Runtime load/run check")
    o.add_argument("--emit-trtexec", action="store_true",
                   help="print the trtexec command that builds a sparse TensorRT engine from the output")
    o.set_defaults(func=cmd_optimize)

    i = sub.add_parser("inspect", help="inputs/outputs, ops, parameters, sparsity, prunable weights; a mode "
                       "flag prints only its part", parents=[common])
    i.add_argument("model")
    i.add_argument("--json", action="store_true", help="one JSON document on stdout")
    i.add_argument("--nm", metavar="N:M", help="check every weight for N:M sparsity along its reduction axis")
    i.add_argument("--groups", action="store_true", help="channel groups: members, width, prunable or why not")
    i.add_argument("--tensorrt", action="store_true", help="which layers TensorRT could run on sparse tensor cores")
    i.add_argument("--dim", action="append", metavar="NAME=VALUE",
                   help="value of a named dynamic dim (shown in the inputs/outputs, used for --tensorrt FLOPs)")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("check", help="compare two models on ONNX Runtime CPU", parents=[common])
    c.add_argument("reference")
    c.add_argument("candidate")
    c.add_argument("--inputs", help=".npz with arrays named after the inputs (random when absent)")
    c.add_argument("--dim", action="append", metavar="NAME=VALUE", help="dynamic dim value for random inputs")
    c.add_argument("--atol", type=float, help="exit 1 if any output's max abs error exceeds this")
    c.add_argument("--rtol", type=float, help="exit 1 if any output's max abs error / max |reference| exceeds this")
    _add_gate_args(c, "")
    c.add_argument("--seed", type=int, default=0, help="seed of the random inputs (when no --inputs)")
    c.add_argument("--pool", choices=["mean"], help="also report cosine of mean-pooled [B,S,H] outputs "
                   "(sentence embeddings; padding excluded via the *mask* input); the cosine gate then uses them")
    c.add_argument("--json", action="store_true", help="one JSON document on stdout (comparison and verdict)")
    c.set_defaults(func=cmd_check)

    b = sub.add_parser("bench", help="time one or two models on ONNX Runtime CPU (interleaved A/B)",
                       parents=[common])
    b.add_argument("models", nargs="+", metavar="MODEL", help="A.onnx [B.onnx]: the ratio is A/B")
    b.add_argument("--inputs", help=".npz with arrays named after the inputs (synthesised from the graph when absent)")
    b.add_argument("--dim", action="append", metavar="NAME=VALUE", help="dynamic dim value for synthesised inputs")
    b.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's)")
    b.add_argument("--runs", type=int, default=15, help="timed runs of each model (interleaved A, B, A, B, ...)")
    b.add_argument("--warmup", type=int, default=3, help="untimed runs of each model first")
    b.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="stop timing after S seconds (at least 3 runs each)")
    b.add_argument("--json", action="store_true", help="one JSON document on stdout")
    b.set_defaults(func=cmd_bench)

    ps = sub.add_parser("passes", help="list registered passes and their options", parents=[common])
    ps.add_argument("--json", action="store_true", help="one JSON document on stdout")
    ps.set_defaults(func=cmd_passes)

    d = sub.add_parser("demo", help="run a representative pipeline on the bundled demo model", parents=[common])
    d.add_argument("-o", "--output-dir", help="keep the demo's output in this folder (default: a temporary "
                   "folder, removed at the end)")
    d.set_defaults(func=cmd_demo)
    return p


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush into a closed pipe stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real stdout (captured in tests)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING if not args.quiet else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    for attr in ("json", "quiet"):
        if not hasattr(args, attr):
            setattr(args, attr, False)
    from onnxprune import progress

    progress.set_enabled(not (args.quiet or args.json))
    plain_before = progress.PLAIN
    progress.set_plain(not args.quiet)  # stage lines when stderr is not a terminal (CI logs)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at interpreter exit
        return code
    except OnnxPruneError as exc:
        if args.verbose:
            log.exception("failed")
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_USAGE)
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `onnxprune ... | head`: the reader left; no message, the shell's SIGPIPE code
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # disk full, permission denied, ... outside the model writer
        if args.verbose:
            log.exception("failed")
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug: still one line (the traceback with -v), never a partial output
        if args.verbose:
            log.exception("internal error")
        msg = " ".join(str(exc).split())[:300]
        print(f"error: internal error ({type(exc).__name__}: {msg}); rerun with -v for the traceback and "
              "please report it", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        progress.set_plain(plain_before)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

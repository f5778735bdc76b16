"""The budgeted search behind the bare ``onnxprune optimize model.onnx`` (onnxprune.auto)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from models import random_inputs
from models.mlp import build_mlp
from models.transformer import build_transformer_block
from onnxprune.analysis.calibration import CalibrationData
from onnxprune.auto import Budget, BudgetError, auto, split_calibration
from onnxprune.bench import Timing
from onnxprune.cli import main
from onnxprune.ir.model import Model

auto_mod = importlib.import_module("onnxprune.auto")  # onnxprune.auto is the function


def _save(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save(proto, str(path))
    return path


def _calib(proto: onnx.ModelProto, path: Path, batches: int = 8, batch: int = 4) -> Path:
    feeds = [random_inputs(proto, batch=batch, seq=8, seed=100 + i) for i in range(batches)]
    arrays = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    np.savez(path, **arrays)
    return path


def _heldout_cos(ref: Path, out: Path, calib: Path, prune_samples: int) -> float:
    """Mean per-sample cosine of the first output on the held-out samples, computed independently."""
    import onnxruntime as ort

    data = dict(np.load(calib))
    held = {k: v[prune_samples:] for k, v in data.items()}
    a = ort.InferenceSession(str(ref), providers=["CPUExecutionProvider"]).run(None, held)[0]
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, held)[0]
    a2, b2 = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    return float(np.mean((a2 * b2).sum(1) / (np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1))))


def test_budget_parse() -> None:
    b = Budget.parse("cos=0.98")
    assert (b.cos, b.top1) == (0.98, 0.99)  # the unnamed bound keeps its default
    assert Budget.parse("top1=none").top1 is None
    assert Budget.parse("atol=0.01").atol == 0.01
    assert Budget.parse("cos=0.95,pool=mean").pool == "mean"
    assert Budget.parse(None).conf == 0.95 and Budget.parse("conf=0.9").conf == 0.9
    assert Budget.parse("conf=none").conf is None
    assert str(Budget.parse("cos=0.98,conf=0.99")) == "cos=0.98,top1=0.99,conf=0.99"
    for bad in ("cos=1.5", "cos=abc", "speed=2", "cos", "cos=none,top1=none", "pool=max", "conf=1", "conf=0.2",
                "conf=x"):
        with pytest.raises(BudgetError):
            Budget.parse(bad)


def test_split_holds_out_whole_batches_and_head_rebuilds_them() -> None:
    proto = build_mlp()
    model = Model(proto)
    feeds = [random_inputs(proto, batch=3, seed=i) for i in range(8)]
    calib = CalibrationData.from_feeds(feeds, model)
    prune, held, n = split_calibration(calib)
    assert (len(prune.feeds), len(held), n) == (6, 2, 18)
    again = calib.head(n)
    assert len(again.feeds) == 6 and all(np.array_equal(a["input"], b["input"])
                                         for a, b in zip(again.feeds, prune.feeds))
    single = CalibrationData.from_feeds([random_inputs(proto, batch=8)], model)
    p1, h1, n1 = split_calibration(single)
    assert n1 == 6 and h1[0]["input"].shape[0] == 2 and p1.feeds[0]["input"].shape[0] == 6
    with pytest.raises(onnxprune.OnnxPruneError):
        split_calibration(CalibrationData.from_feeds([random_inputs(proto, batch=1)], model))


def test_budget_is_kept_on_heldout_and_spec_reproduces_bytes(tmp_path: Path) -> None:
    proto = build_transformer_block(hidden=64, heads=4, ffn=256, layers=2)
    src = _save(proto, tmp_path / "m.onnx")
    calib = _calib(proto, tmp_path / "calib.npz")
    out = tmp_path / "auto.onnx"
    rep = tmp_path / "r.json"
    assert main(["optimize", str(src), "-o", str(out), "--calib", str(calib), "--calib-batch", "4",
                 "--budget", "cos=0.995", "--report", str(rep), "-q"]) == 0
    import json

    data = json.loads(rep.read_text())
    # the search measured candidates that broke the budget, so the budget really constrained it
    assert any(not c["keeps"] for c in data["candidates"] if c["modified"])
    assert data["prune_samples"] == 24
    # held out on samples the passes never saw, measured here independently of the tool
    assert _heldout_cos(src, out, calib, data["prune_samples"]) >= 0.995
    # the reproducing spec gives the same bytes when rerun with --passes
    again = tmp_path / "again.onnx"
    assert main(["optimize", str(src), "-o", str(again), "--passes", data["winner"]["spec"] if
                 data["winner"]["label"] == "cleanup" else "cleanup," + data["winner"]["spec"],
                 "--calib", str(calib), "--calib-batch", "4", "--calib-limit", str(data["prune_samples"]),
                 "-q"]) == 0
    assert again.read_bytes() == out.read_bytes()
    assert data["reproduce"].count("--calib-limit 24") == 1


def test_never_slower_than_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """When every candidate times slower, the cleaned input is returned and the report says so."""
    proto = build_transformer_block(hidden=64, heads=4, ffn=256)
    model = Model(proto)

    def slow(models: list, feeds: dict, **_: object) -> list[Timing]:
        return [Timing(1.0, 0.9, 1.1, 5)] + [Timing(1.5, 1.4, 1.6, 5) for _ in models[1:]]

    monkeypatch.setattr(auto_mod, "_bench", lambda models, feeds, threads, max_seconds: slow(models, feeds))
    res = auto(model, budget="cos=0.5")  # a loose budget: structural candidates keep it
    assert any(c.keeps and c.modified and c.label != "cleanup" for c in res.report.candidates)
    assert res.spec == "cleanup"
    assert res.report.reason.startswith("nothing helped")
    assert "RANDOM INPUTS" in res.report.format().splitlines()[0]


def test_a_win_that_the_re_timing_against_the_input_does_not_confirm_is_not_taken(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The search's timing run says a candidate is 1.5x faster; the re-timing against the input model
    (a fresh run) says it is not: the cleaned model is returned, and the report shows both numbers."""
    proto = build_transformer_block(hidden=64, heads=4, ffn=256)
    calls: list[int] = []

    def first_fast_then_not(models: list, feeds: dict, threads: object, max_seconds: object) -> list[Timing]:
        calls.append(len(models))
        if len(calls) == 1:  # the search's run: [cleaned, candidates...]
            return [Timing(1.5, 1.4, 1.6, 5)] + [Timing(1.0, 0.9, 1.1, 5) for _ in models[1:]]
        return [Timing(1.0, 0.9, 1.1, 5) for _ in models]  # the re-timing: [input, cleaned, top...]

    monkeypatch.setattr(auto_mod, "_bench", first_fast_then_not)
    res = auto(Model(proto), budget="cos=0.5")
    assert len(calls) == 2 and calls[1] == 2 + min(auto_mod.CONFIRM, calls[0] - 1)
    assert res.spec == "cleanup"
    assert res.report.reason.startswith("nothing helped: re-timed against the input model")
    retimed = [c for c in res.report.candidates if c.confirm_speedup is not None]
    assert retimed and all(abs(c.confirm_speedup - 1.0) < 1e-9 for c in retimed)
    assert "re-timed" in res.report.format()


def test_cos_is_judged_on_its_lower_confidence_bound() -> None:
    """Held-out mean cosine above the bound but spread wide: kept on the plain mean (conf=none), refused
    on the 95% lower bound; the same mean with little spread keeps both."""
    from onnxprune.auto import Scorer

    proto = build_mlp(hidden=(32,))
    model = Model(proto)
    feed = random_inputs(proto, batch=16, seed=3)
    rng = np.random.default_rng(0)
    scorers = {c: Scorer(model, [feed], Budget.parse(f"cos=0.9,top1=none,conf={c}")) for c in ("none", "0.95")}
    ref = scorers["none"].reference[0][scorers["none"].names[0]]

    def blend(targets: np.ndarray) -> np.ndarray:  # rows whose cosine with ref is exactly targets
        noise = rng.standard_normal(ref.shape)
        noise -= (noise * ref).sum(1, keepdims=True) / (ref * ref).sum(1, keepdims=True) * ref  # orthogonal to ref
        noise *= (np.linalg.norm(ref, axis=1) / np.linalg.norm(noise, axis=1))[:, None]
        t = targets[:, None]
        return (t * ref + np.sqrt(1 - t * t) * noise).astype(np.float32)

    wide = blend(np.where(np.arange(16) % 2 == 0, 0.999, 0.82))  # mean 0.9095, s 0.092: bound 0.872
    narrow = blend(np.full(16, 0.9095))
    for name, out, keeps in (("wide", wide, {"none": True, "0.95": False}),
                             ("narrow", narrow, {"none": True, "0.95": True})):
        for conf, scorer in scorers.items():
            score = scorer.compare([{scorer.names[0]: out}])
            assert score.keeps == keeps[conf], (name, conf, score.failures)
            d = score.per_output[scorer.names[0]]
            assert abs(d["cos"] - 0.9095) < 1e-4
    failed = scorers["0.95"].compare([{scorers["0.95"].names[0]: wide}]).failures
    assert "lower 0.95 bound" in failed[0]


def test_faster_candidate_wins_and_is_reproducible(monkeypatch: pytest.MonkeyPatch) -> None:
    proto = build_transformer_block(hidden=64, heads=4, ffn=256)
    model = Model(proto)

    def by_size(models: list, feeds: dict, threads: object, max_seconds: object) -> list[Timing]:
        # latency proportional to parameters: the smallest kept candidate must win
        from onnxprune.summary import count_parameters

        return [Timing(count_parameters(m) / 1e4, 0, 0, 5) for m in models]

    monkeypatch.setattr(auto_mod, "_bench", by_size)
    res = auto(model, budget="cos=0.9")
    kept = [c for c in res.report.candidates if c.keeps and c.modified and c.label != "cleanup"]
    assert kept and res.report.winner.parameters == min(c.parameters for c in kept)
    again = onnxprune.optimize(model, res.spec, verify=True).model
    assert again.proto.SerializeToString() == res.model.proto.SerializeToString()


def test_bare_optimize_runs_without_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = Path(onnxprune.__file__).parent / "data" / "demo_cnn.onnx"
    dst = tmp_path / "demo_cnn.onnx"
    dst.write_bytes(src.read_bytes())
    assert main(["optimize", str(dst), "--time-limit", "60"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("RANDOM INPUTS")
    assert "reproduce: onnxprune optimize" in out
    assert (tmp_path / "demo_cnn.pruned.onnx").is_file()
    assert dst.read_bytes() == src.read_bytes()  # the input is never written over


def test_tensorrt_target_leaves_small_layers_dense(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proto = build_transformer_block(hidden=64, heads=4, ffn=256)
    src = _save(proto, tmp_path / "m.onnx")
    assert main(["optimize", str(src), "--target", "tensorrt", "--budget", "cos=0.98", "-o",
                 str(tmp_path / "t.onnx")]) == 0
    out = capsys.readouterr().out
    assert "trtexec" in out
    assert "left dense" in out  # 64-wide layers: the measured table says 2:4 does not pay
    m = onnxprune.load(tmp_path / "t.onnx")
    assert any(n.op_type == "Cast" for n in m.graph.node)  # fp16 with fp32 I/O


def test_bad_budget_and_target_are_usage_errors(tmp_path: Path) -> None:
    src = _save(build_mlp(), tmp_path / "m.onnx")
    assert main(["optimize", str(src), "--budget", "cos=2"]) != 0
    assert main(["optimize", str(src), "--calib-limit", "3", "--passes", "cleanup"]) != 0
    assert not (tmp_path / "m.pruned.onnx").exists()


def test_padding_is_left_out_and_pool_mean_scores_sentence_embeddings() -> None:
    """Changes at padded positions do not count; pool=mean scores the mean over real tokens."""
    from onnxprune.auto import Scorer

    proto = build_transformer_block(hidden=64, heads=4, ffn=128)
    model = Model(proto)
    feed = random_inputs(proto, batch=2, seq=8)
    feed["attention_mask"][:, 4:] = 0  # half of every sample is padding
    strict = Scorer(model, [feed], Budget.parse("cos=0.999"))
    # the same model scores 1.0 on itself, masked or pooled
    assert strict.score(model).keeps
    pooled = Scorer(model, [feed], Budget.parse("cos=0.999,pool=mean"))
    ref = strict.reference[0][strict.names[0]]
    # a candidate whose padded positions differ wildly but whose real tokens agree keeps the budget
    bad = ref.copy()
    bad[:, 4:] = -bad[:, 4:] * 100
    for scorer in (strict, pooled):
        scorer_out = {scorer.names[0]: bad}
        score = _score_outputs(scorer, scorer_out)
        assert score.keeps, score.failures
    # while a change at a real token is seen
    worse = ref.copy()
    worse[:, :4] = -worse[:, :4]
    assert not _score_outputs(strict, {strict.names[0]: worse}).keeps


def _score_outputs(scorer, outputs):  # type: ignore[no-untyped-def]
    """Score fixed outputs (as if a candidate had produced them) through the scorer's comparison."""
    return scorer.compare([outputs])


def test_channel_stats_are_cached_by_content(monkeypatch: pytest.MonkeyPatch) -> None:
    """The search prunes one model at many ratios: the same statistics are computed once, and a
    changed weight is a different model."""
    from onnxprune.analysis import calibration as cal

    cal.clear_stats_cache()
    proto = build_mlp()
    model = Model(proto)
    data = CalibrationData.from_feeds([random_inputs(proto, batch=4, seed=i) for i in range(2)], model)
    probe = [(proto.graph.node[0].output[0], -1)]
    calls = []
    real = cal.stream
    monkeypatch.setattr(cal, "stream", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    first = cal.channel_stats(model, data, probe)
    again = cal.channel_stats(model.copy(), data, probe)
    assert len(calls) == 1
    assert all(np.array_equal(first[k][0], again[k][0]) for k in first)
    w = proto.graph.initializer[0].name
    model.set_array(w, model.get_array(w) * 2)
    changed = cal.channel_stats(model, data, probe)
    assert len(calls) == 2
    assert not np.allclose(changed[probe[0]][0], first[probe[0]][0])
    cal.clear_stats_cache()


@pytest.mark.parametrize("build", ["mlp", "cnn", "transformer", "gqa_rotary", "ms_attention"])
def test_search_succeeds_on_every_builder(build: str) -> None:
    """The bare command works on each kind of test model: the result runs, keeps the budget on the
    held-out inputs (re-scored independently of the search's own numbers) and reproduces from its spec."""
    from models.attention import build_attention, build_ms_attention
    from models.cnn import build_cnn
    from onnxprune.auto import Scorer, search_data

    proto = {"mlp": build_mlp, "cnn": build_cnn, "transformer": build_transformer_block,
             "gqa_rotary": lambda: build_attention(hq=4, hkv=2, d=8, rotary=True),
             "ms_attention": build_ms_attention}[build]()
    model = Model(proto)
    res = auto(model, budget="cos=0.95", time_limit=60)
    data = search_data(model)  # the same synthesised held-out inputs (deterministic seeds)
    assert Scorer(model, data.heldout, Budget.parse("cos=0.95")).score(res.model).keeps
    again = onnxprune.optimize(model, res.spec, verify=True).model
    assert again.proto.SerializeToString() == res.model.proto.SerializeToString()


def test_bare_optimize_reports(tmp_path: Path) -> None:
    """--report r.json holds every candidate and the final pipeline; r.html the chosen pipeline's page."""
    import json

    src = _save(build_mlp(), tmp_path / "m.onnx")
    assert main(["optimize", str(src), "-q", "--time-limit", "30", "--report", str(tmp_path / "r.json")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["candidates"][0]["label"] == "cleanup" and data["pipeline"]["passes"]
    assert data["output"]["path"].endswith("m.pruned.onnx")
    assert main(["optimize", str(src), "-q", "--time-limit", "30", "-o", str(tmp_path / "h.onnx"),
                 "--report", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().lstrip().lower().startswith("<!doctype html")


def test_dead_structure_is_removed_first_and_pinned_in_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly-zero FFN neurons and heads go before any search (exact), and the spec reproduces them."""
    from onnx import numpy_helper

    proto = build_transformer_block(hidden=64, heads=4, ffn=256)
    for t in proto.graph.initializer:
        if t.name in ("layer0.ffn.down.weight", "layer0.attn.out.weight"):
            arr = numpy_helper.to_array(t).copy()
            arr[16:32] = 0  # 16 FFN neurons; head 1's rows of the output projection
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    model = Model(proto)

    def slow(models: list, feeds: dict, **_: object) -> list[Timing]:
        return [Timing(1.0, 0.9, 1.1, 5)] + [Timing(1.5, 1.4, 1.6, 5) for _ in models[1:]]

    monkeypatch.setattr(auto_mod, "_bench", lambda models, feeds, threads, max_seconds: slow(models, feeds))
    res = auto(model, budget="cos=0.999")
    assert res.spec == "cleanup,ffn(criterion=dead),heads(criterion=dead)"
    dead = next(c for c in res.report.candidates if c.label == "dead units")
    assert dead.min_cos is not None and dead.min_cos > 1 - 1e-6
    assert res.model.get_array("layer0.ffn.down.weight").shape[0] == 240
    assert res.model.get_array("layer0.attn.out.weight").shape[0] == 48
    again = onnxprune.optimize(model, res.spec, verify=True).model
    assert again.proto.SerializeToString() == res.model.proto.SerializeToString()


def test_latency_is_timed_at_the_deployment_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """--latency-batch: candidates are timed on that many samples (cut or repeated), and the report says so."""
    from onnxprune.auto import latency_feed

    feed = {"input_ids": np.arange(32).reshape(4, 8), "attention_mask": np.ones((4, 8), np.int64)}
    assert latency_feed(feed, None)["input_ids"].shape == (4, 8)
    assert latency_feed(feed, 1)["input_ids"].tolist() == [list(range(8))]
    assert latency_feed(feed, 6)["input_ids"].shape == (6, 8)
    seen: list[tuple[int, ...]] = []

    def record(models: list, feeds: dict, threads: object, max_seconds: object) -> list[Timing]:
        seen.append(feeds["input_ids"].shape)
        return [Timing(1.0, 0.9, 1.1, 5) for _ in models]

    monkeypatch.setattr(auto_mod, "_bench", record)
    proto = build_transformer_block(hidden=64, heads=4, ffn=256)
    res = auto(Model(proto), budget="cos=0.5", latency_batch=1)
    assert seen and all(s[0] == 1 for s in seen)
    assert "timed on input_ids [1," in res.report.format().splitlines()[1]
    with pytest.raises(onnxprune.errors.OnnxPruneError):
        auto(Model(proto), latency_batch=0)


def test_a_build_that_would_outrun_the_time_limit_is_not_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline is checked against the expected length of the next build plus the time kept to
    rebuild the winner, per kind: a slow kind stops while a quick one still fits."""
    clock = [1000.0]
    monkeypatch.setattr(auto_mod.time, "monotonic", lambda: clock[0])
    model = Model(build_mlp())
    data = auto_mod.search_data(model)
    lines: list[str] = []
    search = auto_mod._Search(model, data, Budget.parse(None), deadline=1100.0, log=lines.append)
    assert not search.out_of_time(["channels"])  # nothing measured yet: the first probe runs
    search.longest.update({"channels": 40.0, "ffn": 2.0})
    search.candidates.append(auto_mod.Candidate("channels 0.2", "channels(ratio=0.2)", True, modified=True,
                                                seconds=40.0))
    clock[0] = 1030.0  # 70 s left: 40 s build + 40 s to rebuild a winner does not fit, 2 s + 40 s does
    assert search.out_of_time(["channels"])
    assert search.stopped and "not starting channels" in lines[-1]
    assert not search.out_of_time(["ffn"])
    assert search.out_of_time(["ffn", "channels"])  # a combination costs its kinds together
    search.candidates[-1].keeps = False  # a slow kind that never kept the budget cannot be the winner
    clock[0] = 1060.0  # 40 s left: a 2 s build (and its 2 s rebuild) fits
    assert not search.out_of_time(["ffn"])
    clock[0] = 1101.0
    assert search.out_of_time()  # past the deadline: everything stops


def test_synthesised_budget_is_also_measured_one_size_up() -> None:
    """Without data half the held-out batches are one candidate size up, and the note names both sizes."""
    proto = build_transformer_block(hidden=64, heads=4, ffn=256)
    data = auto_mod.search_data(Model(proto))
    sizes = sorted({tuple(v.shape) for f in data.heldout for v in f.values()})
    assert len(data.heldout) == auto_mod.SYNTH_BATCHES[1] and len(sizes) == 2
    assert sizes[0][1] < sizes[1][1]  # a longer sequence, same rank
    first = next(iter(data.heldout[0].values())).shape
    assert first == sizes[1]  # the batch latency is timed on is the larger one
    assert data.note.count("[") >= 2 and " and (" in data.note

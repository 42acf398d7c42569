"""benchmarks/perf.py at its tiniest: every path runs (bare timm forward, model, engine, concurrent
engine, the HTTP path through a real server subprocess, ONNX Runtime on the CPU) and the JSON has every
section with positive figures, ratios that agree with them and target verdicts that agree with the
ratios. Correctness of the output only, never speed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import perf

BATCHES = (1, 2)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("perf")
    args = perf.parse_args(
        [
            "--out",
            str(out),
            "--backbones",
            "tiny",
            "--batches",
            ",".join(map(str, BATCHES)),
            "--seconds",
            "0.05",
            "--rounds",
            "1",
            "--threads",
            "1",
            "--tasks",
            "2",
            "--strict",
        ]
    )
    returned = perf.run(args)
    written = json.loads((out / "perf.json").read_text())
    assert written["backbones"].keys() == returned["backbones"].keys()
    written["_out"] = str(out)
    return written


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_machine_and_settings_are_recorded(result: dict) -> None:
    machine = result["machine"]
    for key in ("cpu_model", "cpu_count", "torch", "date", "git", "python"):
        assert machine.get(key) not in (None, ""), key
    assert result["settings"]["batches"] == list(BATCHES)
    assert result["benchmark"] == "perf" and result["command"]


def test_every_path_has_positive_figures_at_every_batch_size(result: dict) -> None:
    tiny = result["backbones"]["tiny"]
    assert tiny["labels"] == 10 and len(tiny["tasks"]) == 2 and tiny["live_version"] == 2
    # On the CPU, with onnxruntime (the dev extra), no path may be skipped or unavailable.
    assert {p: tiny[p]["status"] for p in perf.PATHS} == dict.fromkeys(perf.PATHS, "ok")
    for path in perf.PATHS:
        for b in BATCHES:
            r = tiny[path][str(b)]
            assert r["batch"] == b
            assert _positive(r["images_per_s"]) and r["iterations"] >= 1 and r["images"] >= b, (path, b)
            lat = r["latency"]
            assert lat["n"] >= 1 and _positive(lat["p50_ms"]) and lat["p99_ms"] >= lat["p50_ms"], (path, b)
            assert len(r["rounds_images_per_s"]) == 1


def test_engine_batches_and_http_answers(result: dict) -> None:
    tiny = result["backbones"]["tiny"]
    for b in BATCHES:
        # One request of b images at a time, with no waiting for company: every batch is the request.
        assert tiny["engine"][str(b)]["mean_batch_size"] == b
        assert tiny["engine_async"][str(b)]["concurrency"] >= 2
        http = tiny["http"][str(b)]
        assert http["concurrency"] >= 2
        assert http["failed_requests"] == 0 and set(http["statuses"]) == {"200"}
        assert _positive(http["server_mean_batch_size"]) and http["request_bytes"] > 0
    info = tiny["http"]["_info"]
    assert info["launcher"] in ("cli", "uvicorn") and info["settings"]["max_batch_size"] == max(BATCHES)


def test_ratios_and_targets(result: dict) -> None:
    tiny = result["backbones"]["tiny"]
    ratios = tiny["ratios_to_bare"]
    for path in ("model", "engine", "engine_async", "http", "onnx"):
        for kind in ("pooled", "median_of_rounds"):
            assert all(_positive(ratios[path][kind][str(b)]) for b in BATCHES), (path, kind)
        for b in BATCHES:  # pooled: the path's images/s over bare's, as written beside them
            expected = tiny[path][str(b)]["images_per_s"] / tiny["bare"][str(b)]["images_per_s"]
            assert math.isclose(ratios[path]["pooled"][str(b)], expected, rel_tol=0.01, abs_tol=0.002), (path, b)
    targets = tiny["targets"]
    for path in ("engine", "engine_async"):
        verdict, medians = targets[f"{path}_ge_0.95_of_bare"], ratios[path]["median_of_rounds"]
        assert verdict["per_batch"] == {str(b): medians[str(b)] >= perf.ENGINE_TARGET for b in BATCHES}
        assert verdict["met"] is all(verdict["per_batch"].values())
    http = targets["http_ge_0.85_of_bare"]
    assert http["batch"] == max(BATCHES)
    assert http["ratio"] == ratios["http"]["median_of_rounds"][str(max(BATCHES))]
    assert http["met"] is (http["ratio"] >= perf.HTTP_TARGET)


def test_plot_is_written(result: dict) -> None:
    assert result["plots"] == ["perf-tiny.png"]
    png = Path(result["_out"]) / "perf-tiny.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

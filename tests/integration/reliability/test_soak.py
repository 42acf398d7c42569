"""A bounded memory soak (issue 8's CI version of benchmarks/soak.py): the leak detector stays quiet on
the real engine over ~80 swaps and fires on the negative control, a version cache that keeps every
loaded snapshot's tensors; and a short soak against a real server fails no request. Correctness only:
the detector's verdicts, never speed."""

from __future__ import annotations

import json

from benchmarks.soak import SoakConfig, detect_leak, leaking_version_cache, run_soak

MB = 2**20


def test_detect_leak_flags_growth_over_the_limit_after_the_warmup():
    flat = [(i, 700 * MB + (i % 3) * 100_000) for i in range(100)]
    verdict = detect_leak(flat, limit_bytes=5 * MB, warmup=10)
    assert verdict["leak"] is False and abs(verdict["growth_mb"]) < 1
    linear = [(i, 700 * MB + i * 200_000) for i in range(100)]
    verdict = detect_leak(linear, limit_bytes=5 * MB, warmup=10)
    assert verdict["leak"] is True and verdict["growth_mb"] > 10
    assert abs(verdict["slope_kb_per_swap"] - 200_000 / 1024) < 1
    # A jump inside the warm-up (caches filling) is not a leak.
    warm = [(i, 700 * MB + (50 * MB if i >= 5 else 0)) for i in range(100)]
    assert detect_leak(warm, limit_bytes=5 * MB, warmup=10)["leak"] is False
    assert detect_leak([], limit_bytes=MB, warmup=0)["leak"] is None


def test_the_leaking_cache_is_installed_only_inside_its_context():
    import server.core.engine as engine_module
    from server.core.versions import VersionCache

    with leaking_version_cache() as leaky:
        assert engine_module.VersionCache is leaky and issubclass(leaky, VersionCache)
    assert engine_module.VersionCache is VersionCache


def test_detector_quiet_on_the_real_engine_and_fires_on_the_leaking_control(tmp_path):
    # The offline glyph ViT's snapshot holds ~280 KB of tensors: the control leaks ~19 MB over the 70
    # swaps after the warm-up; the real engine grew ~3 MB in trials. The limit sits between the two.
    cfg = SoakConfig(
        out=tmp_path / "out",
        swaps=80,
        backbone="offline",
        limit_mb=10.0,
        warmup=10,
        runs=("harness", "leaky"),
        rollback_every=25,
        prune_every=30,
    )
    result = run_soak(cfg)
    real, leaky = result["runs"]["harness"], result["runs"]["leaky"]
    assert real["cache_class"] == "VersionCache" and leaky["cache_class"] == "LeakyVersionCache"
    assert leaky["leaked_snapshots"] >= 70  # one per load: the control really leaks
    assert real["engine_swaps_total"] >= 80 and leaky["engine_swaps_total"] >= 80
    assert real["not_served"] == 0 and leaky["not_served"] == 0
    assert real["requests"]["failed"] == 0 and real["requests"]["ok"] > 0
    assert len(real["rss"]) == 81 and len(leaky["rss"]) == 81

    assert real["leak_detected"] is False, real["rss_check"]
    assert leaky["leak_detected"] is True, leaky["rss_check"]
    assert result["verdict"]["real_runs_under_limit"] and result["verdict"]["control_caught"]
    written = json.loads((cfg.out / "soak.json").read_text())
    assert written["verdict"] == result["verdict"]
    assert (cfg.out / "soak.png").stat().st_size > 0


def test_server_soak_serves_every_swap_without_a_failed_request(tmp_path):
    cfg = SoakConfig(out=tmp_path / "out", swaps=25, backbone="tiny", runs=("server",), rollback_every=6, plot=False)
    result = run_soak(cfg)
    run = result["runs"]["server"]
    assert run["not_served"] == 0
    assert run["requests"]["failed"] == 0 and run["requests"]["ok"] > 0
    assert run["server_alive_at_end"]
    assert run["server_swaps_failed_total"] == 0 and run["server_swaps_total"] >= 25
    assert len(run["rss"]) == 26 and all(b > 0 for _, b in run["rss"])
    assert run["rss_check"]["leak"] is False  # 50 MB: the target

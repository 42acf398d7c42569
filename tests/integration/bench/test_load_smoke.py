"""benchmarks/load.py bounded: a real server whose queue holds two images and whose batches wait 200 ms
for company, so concurrent requests find it full. Overload must be answered with 429 (Retry-After)
rather than timeouts, and every request must succeed once the overload stops. Correctness, not speed."""

from __future__ import annotations

import json

from benchmarks import load


def test_overload_is_rejected_with_retry_after_and_the_server_recovers(tmp_path) -> None:
    args = load.parse_args(
        [
            "--out", str(tmp_path), "--backbone", "tiny", "--seconds", "0.4", "--max-concurrency", "4",
            "--max-queue", "2", "--images-per-request", "2", "--max-batch-size", "8", "--max-wait-ms", "200",
            "--burst", "32", "--recovery-seconds", "0.6", "--threads", "1",
        ]
    )  # fmt: skip
    load.run(args)
    result = json.loads((tmp_path / "load.json").read_text())
    assert [step["concurrency"] for step in result["ramp"]] == [1, 2, 4]
    assert all(step["ok"] >= 1 for step in result["ramp"])
    assert result["ramp"][0]["rejected"] == 0  # one client alone is never turned away
    burst = result["burst"]
    assert burst["requests"] == 32 and burst["rejected"] >= 1 and burst["statuses"].get("429", 0) >= 1
    checks = result["analysis"]["checks"]
    assert checks == {
        "overload_answered_with_429_or_503": True,
        "every_rejection_has_retry_after": True,
        "no_timeouts": True,
        "no_unexpected_errors": True,
        "latency_bounded_below_timeout": True,
        "recovered": True,
    }
    for phase in [*result["ramp"], burst, result["recovery"]]:  # the counts add up
        statuses = {int(k): v for k, v in phase["statuses"].items()}
        assert sum(statuses.values()) == phase["requests"]
        assert statuses.get(200, 0) == phase["ok"] == phase["latency"]["n"]
        assert phase["rejected"] == statuses.get(429, 0) + statuses.get(503, 0)
    assert result["recovery"]["requests"] >= 1 and result["server_alive_at_end"] is True
    assert result["analysis"]["plateau_images_per_s"] > 0
    assert result["machine"]["torch"] and result["launcher"] in ("cli", "uvicorn")
    for name in ("load.png", "load-timeline.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"

import json

from typer.testing import CliRunner

from fmlora.cli import app


def test_bench_cli_writes_results_summary_and_plots(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--benchmark",
            "synthetic",
            "--methods",
            "fmlora,seq-lora,joint",
            "--seeds",
            "0",
            "--tasks",
            "2",
            "--epochs",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["fmlora", "seq-lora", "joint"]
    required = {
        "benchmark",
        "method",
        "seed",
        "tasks",
        "backbone",
        "final_accuracy",
        "average_incremental_accuracy",
        "forgetting",
        "accuracy_matrix",
        "trainable_params_per_task",
        "adapter_bytes_per_task",
        "seconds",
    }
    assert all(required <= set(r) for r in rows)
    fm = rows[0]
    assert len(fm["accuracy_matrix"]) == 2 and len(set(fm["adapter_bytes_per_task"])) == 1
    assert rows[2]["forgetting"] is None and len(rows[2]["accuracy_matrix"]) == 1
    summary = (out / "summary.md").read_text()
    assert "| fmlora |" in summary and "| joint |" in summary
    for name in ("matrix-fmlora.png", "matrix-seq-lora.png", "matrix-joint.png", "accuracy-vs-tasks.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_rejects_unknown_methods_with_a_clear_error(tmp_path):
    result = CliRunner().invoke(
        app, ["bench", "--benchmark", "synthetic", "--methods", "magic", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "unknown methods" in result.output

import json

from typer.testing import CliRunner

from fmlora.cli import app
from fmlora.data import make_synthetic_stream

# The benchmarks' tiny models need no 4,000-feature head: a smaller one keeps each task's λ search
# (seconds at 4,000) out of the test run. The head's size has tests of its own.
SMALL_HEAD = ("--model-option", "head.random_features=512")
SMALL_HEAD_OPTIONS = {"head.random_features": 512}


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
            *SMALL_HEAD,
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
    # The served snapshot grows with the classes (head rows), the adapter inside it does not.
    snapshot = fm["snapshot_bytes_per_task"]
    assert snapshot[1] > snapshot[0] > fm["adapter_bytes_per_task"][0]
    assert rows[2]["forgetting"] is None and len(rows[2]["accuracy_matrix"]) == 1
    modes = fm["prompt_modes"]
    assert set(modes) == {"auto", "none", "task"} and all(0 <= v <= 1 for v in modes.values())
    assert modes["auto"] == fm["final_accuracy"] and rows[1]["prompt_modes"] is None  # seq-lora has no prompts
    summary = (out / "summary.md").read_text()
    assert "| fmlora |" in summary and "| joint |" in summary and "| method | auto | none | task |" in summary
    for name in ("matrix-fmlora.png", "matrix-seq-lora.png", "matrix-joint.png", "accuracy-vs-tasks.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_rejects_unknown_methods_with_a_clear_error(tmp_path):
    result = CliRunner().invoke(
        app, ["bench", "--benchmark", "synthetic", "--methods", "magic", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "unknown methods" in result.output


def test_glyph_benchmarks_run_end_to_end_with_joint_on_both_kinds(tmp_path):
    from fmlora.bench import BenchSpec, run_benchmark
    from tests.conftest import TINY_RANDOM

    for benchmark in ("glyphs", "glyphs-dil"):
        out = tmp_path / benchmark
        spec = BenchSpec(
            benchmark,
            ("fmlora", "joint"),
            (0,),
            out,
            num_tasks=2,
            epochs=1,
            backbone=TINY_RANDOM,
            model_options=SMALL_HEAD_OPTIONS,
        )
        rows = run_benchmark(spec)
        fm, joint = rows
        assert fm["kind"] == ("class" if benchmark == "glyphs" else "domain") and fm["protocol"] == "sequential"
        assert joint["protocol"] == "joint" and len(joint["accuracy_matrix"][0]) == 2
        if benchmark == "glyphs":
            assert not set(fm["task_classes"][0]) & set(fm["task_classes"][1])
        else:
            assert fm["task_classes"][0] == fm["task_classes"][1] and len(fm["task_classes"][0]) == 81
        assert all(0 <= a <= 1 for row in fm["accuracy_matrix"] for a in row)
        assert fm["backbone_sha256"] and fm["backbone_config"]["name"] == TINY_RANDOM.name


def test_backbone_override_keeps_what_still_applies():
    from pathlib import Path

    from fmlora.bench.runner import _paper_backbone, override_backbone
    from fmlora.model import BackboneConfig

    paper = _paper_backbone(Path("."))
    other = override_backbone(paper, "vit_small_patch16_224.augreg_in21k", None)
    assert other.data_config_overrides == paper.data_config_overrides and other.weights == "pretrained"
    glyph = BackboneConfig.offline()
    retrained = override_backbone(glyph, None, "runs/pretrain/x.safetensors")
    assert retrained.model_kwargs == glyph.model_kwargs and retrained.input_norm == "per-image"
    assert retrained.weights_path == Path("runs/pretrain/x.safetensors")
    hub = override_backbone(glyph, "vit_small_patch16_224", "random")
    assert hub.model_kwargs == {} and hub.input_norm == "timm" and hub.weights == "random"


def test_training_free_baselines_run_on_class_and_domain_streams(tmp_path):
    from fmlora.bench import BenchSpec, run_benchmark
    from tests.conftest import TINY_RANDOM

    for benchmark in ("glyphs", "glyphs-dil"):
        spec = BenchSpec(benchmark, ("ncm", "ranpac"), (0,), tmp_path / benchmark, num_tasks=2, backbone=TINY_RANDOM)
        ncm, ranpac = run_benchmark(spec)
        for row in (ncm, ranpac):
            assert row["training_free"] and row["trainable_params_per_task"] == [0, 0]
            assert len(row["accuracy_matrix"]) == 2 and all(0 <= a <= 1 for r in row["accuracy_matrix"] for a in r)
        # Statistics grow per class: the heads cover every class seen, whatever the image count.
        classes = len({c for task in ncm["task_classes"] for c in task})
        assert ncm["head_bytes"] == classes * 64 * 4 and ranpac["head_bytes"] == classes * 2000 * 4
        assert len(ranpac["relative_lambdas"]) == 2
        assert "| ncm |" in (tmp_path / benchmark / "summary.md").read_text()


def test_bench_cli_takes_training_options_and_refuses_bad_ones(tmp_path):
    out = tmp_path / "bench"
    args = [
        "bench",
        "--benchmark",
        "synthetic",
        "--methods",
        "fmlora-continual",
        "--tasks",
        "2",
        "--epochs",
        "1",
        *SMALL_HEAD,
    ]
    options = ["--train-option", "later_lr_scale=1.0", "--train-option", "drift_compensation=none"]
    result = CliRunner().invoke(app, [*args, *options, "--out", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads((out / "results.json").read_text())
    assert row["train_config"]["later_lr_scale"] == 1.0 and row["train_config"]["drift_compensation"] == "none"
    assert row["drift_compensated_per_task"] == [False, False] and row["feature_drift_per_task"][1] > 0
    for bad in ("later_lr_scale=-1", "no_such_option=1", "later_lr_scale"):
        result = CliRunner().invoke(app, [*args, "--train-option", bad, "--out", str(tmp_path / "bad")])
        assert result.exit_code == 2, (bad, result.output)
        assert "later_lr_scale" in result.output or "no_such_option" in result.output or "KEY=VALUE" in result.output


def test_train_per_class_keeps_that_many_training_images_and_is_recorded(tmp_path, monkeypatch):
    import fmlora.bench.runner as runner

    seen = []

    def capture(method, config, tasks, train, seed):
        seen.extend((t.train.labels.bincount().tolist(), len(t.test)) for t in tasks)
        raise SystemExit(0)

    monkeypatch.setattr(runner, "run_baseline", capture)
    args = ["bench", "--benchmark", "synthetic", "--methods", "ncm", "--tasks", "2", "--out", str(tmp_path / "b")]
    full = CliRunner().invoke(app, args)
    cut = CliRunner().invoke(app, [*args, "--train-per-class", "3"])
    assert full.exit_code == cut.exit_code == 0
    (full_counts, full_test), (_, _), (cut_counts, cut_test) = seen[0], seen[1], seen[2]
    assert min(full_counts) > 3 and cut_counts == [3] * len(full_counts) and cut_test == full_test
    assert CliRunner().invoke(app, [*args, "--train-per-class", "0"]).exit_code == 2
    monkeypatch.undo()
    assert CliRunner().invoke(app, [*args, "--train-per-class", "3"]).exit_code == 0
    (row,) = json.loads((tmp_path / "b" / "results.json").read_text())
    assert row["train_per_class"] == 3 and row["method"] == "ncm"


def test_fold_in_rest_hands_each_task_the_images_left_out_of_training(tmp_path, monkeypatch):
    import fmlora.bench.runner as runner

    seen = []

    def capture(method, config, tasks, learner, held_out=None):
        assert held_out is not None and len(held_out) == len(tasks)
        seen.extend(
            (t.train.labels.bincount().tolist(), h.labels.bincount().tolist())
            for t, h in zip(tasks, held_out, strict=True)
        )
        raise SystemExit(0)

    monkeypatch.setattr(runner, "_run_sequential", capture)
    args = ["bench", "--benchmark", "synthetic", "--methods", "fmlora", "--tasks", "2", "--out", str(tmp_path / "b")]
    assert CliRunner().invoke(app, [*args, "--train-per-class", "3", "--fold-in-rest"]).exit_code == 0
    full = make_synthetic_stream(num_tasks=2, seed=0)
    expected = [([3] * len(t.classes), [n - 3 for n in t.train.labels.bincount().tolist()]) for t in full]
    assert seen == expected and all(min(rest) > 0 for _, rest in seen)
    result = CliRunner().invoke(app, [*args, "--fold-in-rest"])
    assert result.exit_code == 2 and "needs --train-per-class" in result.output

"""A real demonstration on a synthetic 3-task class-incremental stream, with a pre-trained tiny ViT."""

import torch

from fmlora.data import make_synthetic_stream
from fmlora.model import FMLoRAModel, load_snapshot, save_snapshot
from fmlora.training import Learner, TrainConfig, apply_strategy
from fmlora.training.learner import evaluate
from tests.conftest import tiny_config

TRAIN = TrainConfig(epochs=10, batch_size=16, lr=5e-3, seed=0, progress_bar=False)


def run(strategy: str, backbone) -> tuple:
    torch.manual_seed(0)
    model = FMLoRAModel(apply_strategy(strategy, tiny_config(backbone=backbone)))
    tasks = make_synthetic_stream(num_tasks=3, classes_per_task=4, train_per_class=24, test_per_class=12, seed=0)
    matrix, reports = Learner(TRAIN).learn_stream(model, tasks)
    return model, tasks, matrix, reports


def test_fmlora_learns_each_task_and_forgets_far_less_than_sequential_lora(pretrained_tiny, tmp_path):
    fm_model, tasks, fm, fm_reports = run("fmlora", pretrained_tiny)
    _, _, seq, _ = run("seq-lora", pretrained_tiny)
    chance = 1 / 12
    print("\nFM-LoRA  accuracy matrix:", [[round(a, 3) for a in row] for row in fm.rows])
    print("seq-LoRA accuracy matrix:", [[round(a, 3) for a in row] for row in seq.rows])
    print(f"FM-LoRA  final {fm.final_accuracy():.3f} forgetting {fm.forgetting():.3f}")
    print(f"seq-LoRA final {seq.final_accuracy():.3f} forgetting {seq.forgetting():.3f}")
    print("ranks chosen:", [r.task.rank for r in fm_reports])
    for t in range(3):
        assert fm.rows[t][t] > 0.7 > 5 * chance, f"task {t} not learned: {fm.rows[t][t]}"
    assert fm.rows[2][0] >= seq.rows[2][0], "FM-LoRA should keep task 0 at least as well"
    assert fm.forgetting() <= seq.forgetting() / 2
    assert fm.final_accuracy() >= seq.final_accuracy() + 0.25, "the solved head should end far above seq-LoRA"

    # The published snapshot serves the same accuracy from a fresh model.
    save_snapshot(fm_model, tmp_path / "v3", version=3, card=fm.summary())
    torch.manual_seed(0)
    served = FMLoRAModel(tiny_config(backbone=pretrained_tiny))
    load_snapshot(served, tmp_path / "v3")
    assert [evaluate(served, t.test) for t in tasks] == fm.rows[2]

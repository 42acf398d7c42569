"""The adapter never grows with the number of tasks (ARCHITECTURE.md §2)."""

import torch

from fmlora.data import ImageSet, TaskData
from fmlora.model import FMLoRAModel, HeadConfig, save_snapshot
from fmlora.training import Learner, TrainConfig
from tests.conftest import random_images, tiny_config


def tiny_task(t: int) -> TaskData:
    images = random_images(4, seed=t)
    data = ImageSet(images, torch.tensor([0, 1, 0, 1]), (f"t{t}a", f"t{t}b"))
    return TaskData(name=f"t{t}", kind="class", train=data, test=data)


def test_adapter_size_is_constant_and_later_tasks_train_only_their_factors(tmp_path):
    torch.manual_seed(0)
    model = FMLoRAModel(tiny_config(head=HeadConfig(kind="linear")))
    learner = Learner(TrainConfig(epochs=1, batch_size=4, progress_bar=False))
    r, n = model.config.adapter.rank, model.adapted_matrix_count
    bank = model.prompt_bank.prompts.numel()
    keys = model.prompt_bank.keys.numel()
    rank_logits = model.rank_selector.logits.numel()
    sizes, params = {}, {}
    base_a = base_b = None
    for t in range(20):
        report = learner.learn_task(model, tiny_task(t))
        if t == 0:
            base_a = model.adapted["blocks.0.attn.qkv"].adapters["q"].lora_A.clone()
            base_b = model.adapted["blocks.0.attn.qkv"].adapters["q"].lora_B.clone()
        else:
            new_head_rows = 2 * (model.embed_dim + 1)
            expected = 2 * r * r * n + bank + keys + new_head_rows + rank_logits
            assert report.trainable_parameters == expected
        if t == 1:
            layer = model.adapted["blocks.0.attn.qkv"].adapters["q"]
            assert torch.equal(layer.lora_A, base_a) and torch.equal(layer.lora_B, base_b)
        if t + 1 in (1, 5, 20):
            manifest = save_snapshot(model, tmp_path / f"after{t + 1}")
            sizes[t + 1] = (manifest.adapter_bytes, model.adapter_parameter_count(), manifest.tensor_bytes)
            params[t + 1] = report.trainable_parameters
    print(
        f"\nr={r}, adapted matrices={n}: 2r^2*n={2 * r * r * n}, bank={bank}, keys={keys}, "
        f"new head rows={2 * (model.embed_dim + 1)}, rank logits={rank_logits}"
    )
    for tasks, (adapter_bytes, count, total) in sizes.items():
        print(f"after {tasks:2d} tasks: adapter bytes={adapter_bytes} adapter params={count} snapshot bytes={total}")
    assert sizes[1][:2] == sizes[5][:2] == sizes[20][:2]
    # Only the head (2 classes per task) and per-task keys/means grow, by exactly their size.
    per_task = (2 * (model.embed_dim + 1) + 2 * model.embed_dim) * 4
    assert sizes[20][2] - sizes[5][2] == 15 * per_task
    assert params[5] == params[20]

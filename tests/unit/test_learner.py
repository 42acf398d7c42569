import torch

from fmlora.data import ImageSet, TaskData, make_synthetic_stream
from fmlora.model import FMLoRAModel, HeadConfig
from fmlora.training import Learner, TrainConfig
from tests.conftest import tiny_config

# These tests check the training loop itself on the linear head (tests/unit/training covers the ridge head).
LINEAR = HeadConfig(kind="linear")


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=8, lr=5e-3, progress_bar=False, **kw)


def test_progress_callback_sees_every_step_and_loss_falls():
    torch.manual_seed(0)
    model = FMLoRAModel(tiny_config(head=LINEAR))
    task = make_synthetic_stream(num_tasks=1, classes_per_task=3, train_per_class=8, test_per_class=2)[0]
    seen = []
    report = Learner(_cfg()).learn_task(model, task, seen.append)
    assert [p.step for p in seen] == list(range(1, 7)) and seen[-1].steps == 6
    assert {p.epoch for p in seen} == {1, 2} and all(p.task == task.name for p in seen)
    assert report.steps == 6 and report.final_loss == seen[-1].loss
    assert seen[-1].loss < seen[0].loss
    assert model.tasks[0].name == task.name and not model.task_in_progress


def test_training_is_deterministic_for_a_seed():
    task = make_synthetic_stream(num_tasks=1, classes_per_task=2, train_per_class=6, test_per_class=2)[0]
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = FMLoRAModel(tiny_config(head=LINEAR))
        Learner(_cfg(seed=3)).learn_task(model, task)
        outs.append(model.adapter_tensors())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_domain_task_reuses_classes_and_trains_shared_rows():
    torch.manual_seed(0)
    model = FMLoRAModel(tiny_config(head=LINEAR))
    first = make_synthetic_stream(num_tasks=1, classes_per_task=2, train_per_class=6, test_per_class=2, seed=0)[0]
    Learner(_cfg()).learn_task(model, first)
    other = make_synthetic_stream(num_tasks=1, classes_per_task=2, train_per_class=6, test_per_class=2, seed=5)[0]
    domain = TaskData("domain2", "domain", other.train, other.test)  # same class names, new appearance
    before = model.head.weight.clone()
    report = Learner(_cfg()).learn_task(model, domain)
    assert model.labels == list(first.classes)
    assert report.task.new_classes == () and not torch.equal(model.head.weight, before)


def test_image_set_concat_unions_classes():
    a = ImageSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ("x", "y"))
    b = ImageSet(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.tensor([0]), ("z",))
    joined = ImageSet.concat([a, b])
    assert joined.classes == ("x", "y", "z") and joined.labels.tolist() == [0, 1, 2]


def test_file_image_set_decodes_resizes_and_concatenates(tmp_path):
    from PIL import Image

    from fmlora.data import ConcatImages, FileImageSet
    from fmlora.errors import DataError

    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 20), colour).save(path)
        paths.append(path)
    files = FileImageSet(tuple(paths), torch.tensor([0, 1]), ("red", "blue"), image_size=(16, 16))
    batch = files.fetch(torch.tensor([1, 0]))
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == torch.uint8
    assert batch[0, 2].float().mean() > 250 and batch[1, 0].float().mean() > 250
    memory = ImageSet(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.tensor([0]), ("black",))
    joined = ConcatImages((files, memory))
    assert joined.classes == ("red", "blue", "black") and joined.labels.tolist() == [0, 1, 2]
    got = joined.fetch(torch.tensor([2, 0]))
    assert got[0].sum() == 0 and got[1, 0].float().mean() > 250
    (tmp_path / "bad.png").write_bytes(b"not an image")
    broken = FileImageSet((tmp_path / "bad.png",), torch.tensor([0]), ("x",), image_size=(8, 8))
    import pytest

    with pytest.raises(DataError, match="cannot decode"):
        broken.fetch(torch.tensor([0]))


def test_augmented_training_through_decode_workers_is_deterministic_and_differs_from_plain():
    task = make_synthetic_stream(num_tasks=1, classes_per_task=2, train_per_class=6, test_per_class=2)[0]
    outs = []
    for augment in (True, True, False):
        torch.manual_seed(0)
        model = FMLoRAModel(tiny_config(head=LINEAR))
        Learner(_cfg(seed=3, augment=augment, loader_workers=1)).learn_task(model, task)
        outs.append(model.adapter_tensors())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert not all(torch.equal(outs[0][k], outs[2][k]) for k in outs[0])

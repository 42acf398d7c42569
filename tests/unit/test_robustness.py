"""What a serving process needs from the model: copies, threads, device moves, clean failure."""

import copy
import threading

import pytest
import torch

from fmlora.data import make_synthetic_stream
from fmlora.errors import AdapterStateError, DataError, PromptError, SnapshotFormatError
from fmlora.model import FMLoRAModel, PromptConfig, load_snapshot, save_snapshot
from fmlora.model.snapshot import CONFIG_FILE, TENSOR_FILE, sha256_file
from fmlora.training import Learner, TrainConfig, new_statistics
from tests.conftest import random_images, tiny_config
from tests.helpers import learn_quickly


@pytest.fixture
def learned(tiny_model: FMLoRAModel) -> FMLoRAModel:
    learn_quickly(tiny_model, "a", ["x", "y"])
    learn_quickly(tiny_model, "b", ["z"], seed=1)
    return tiny_model.eval()


def test_deepcopy_gives_an_independent_equal_model(learned):
    x = learned.preprocessor(random_images(3))
    clone = copy.deepcopy(learned)
    with torch.no_grad():
        assert torch.equal(clone(x, ["auto", "none", {"task": "a"}]), learned(x, ["auto", "none", {"task": "a"}]))
        clone.adapted["blocks.0.attn.qkv"].adapters["q"].core.add_(1.0)
        assert not torch.equal(clone(x), learned(x))


def test_bare_backbone_in_one_thread_does_not_leak_into_another(learned):
    x = learned.preprocessor(random_images(2))
    with torch.no_grad():
        adapted = learned(x)
    inside, release = threading.Event(), threading.Event()

    def measure_backbone() -> None:
        with learned.adapters_disabled():
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=measure_backbone)
    worker.start()
    assert inside.wait(10)
    with torch.no_grad():
        during = learned(x)
    release.set()
    worker.join()
    assert torch.equal(during, adapted)


def test_merged_weight_follows_the_model_to_another_dtype(learned):
    x = learned.preprocessor(random_images(2))
    learned.merge()
    learned.to(torch.float64)
    layer = learned.adapted["blocks.0.attn.qkv"]
    assert layer.merged_weight.dtype == torch.float64
    with torch.no_grad():
        out = learned(x.double())
    assert out.dtype == torch.float64


def test_failed_task_is_rolled_back_and_can_be_retried(tiny_model):
    stream = make_synthetic_stream(num_tasks=2, classes_per_task=2, train_per_class=4, test_per_class=2)
    # Every task trains, so the interruption lands mid-training of the second.
    learner = Learner(TrainConfig(epochs=1, batch_size=4, progress_bar=False, adaptation="continual"))
    stats = new_statistics(tiny_model)
    learner.learn_task(tiny_model, stream[0], statistics=stats)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    gram = stats.gram.clone()
    labels = tiny_model.labels

    def explode(progress) -> None:
        if progress.step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        learner.learn_task(tiny_model, stream[1], explode, statistics=stats)
    after = tiny_model.state_dict()
    assert torch.equal(stats.gram, gram) and stats.labels == labels  # the statistics rolled back too
    assert not tiny_model.task_in_progress and tiny_model.labels == labels
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert tiny_model.trainable_parameter_count() == 0
    learner.learn_task(tiny_model, stream[1], statistics=stats)
    assert [t.name for t in tiny_model.tasks] == ["task0", "task1"]


def test_learning_leaves_the_global_rng_alone(tiny_model):
    task = make_synthetic_stream(num_tasks=1, classes_per_task=2, train_per_class=4, test_per_class=2)[0]
    state = torch.get_rng_state()
    Learner(TrainConfig(epochs=1, batch_size=4, progress_bar=False)).learn_task(
        tiny_model, task, statistics=new_statistics(tiny_model)
    )
    assert torch.equal(torch.get_rng_state(), state)


def test_caller_mistakes_are_typed_errors(learned):
    x = learned.preprocessor(random_images(2))
    with pytest.raises(PromptError):
        learned(x, 5)
    with pytest.raises(PromptError):
        learned(x, ["auto"])
    with pytest.raises(DataError):
        learned(random_images(2))  # uint8, not preprocessed
    with pytest.raises(DataError):
        learned(torch.zeros(2, 3, 16, 16))
    learned.begin_task("c", "class", ["q"], 0.5, 0.5)
    with pytest.raises(AdapterStateError):
        learned.end_task(torch.zeros(learned.embed_dim))  # prompts on: the task key is required
    with pytest.raises(AdapterStateError):
        learned.begin_task("d", "class", ["r"], 0.5, 0.5)


def test_non_finite_snapshot_tensors_are_refused(learned, tmp_path):
    from safetensors.torch import load_file, save_file

    save_snapshot(learned, tmp_path / "v1")
    tensors = load_file(str(tmp_path / "v1" / TENSOR_FILE))
    tensors["head.bias"][0] = float("nan")
    save_file(tensors, str(tmp_path / "v1" / TENSOR_FILE))
    manifest = (tmp_path / "v1" / CONFIG_FILE).read_text()
    import json

    data = json.loads(manifest)
    data["tensors_sha256"] = sha256_file(tmp_path / "v1" / TENSOR_FILE)
    (tmp_path / "v1" / CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(SnapshotFormatError, match="finite"):
        load_snapshot(learned, tmp_path / "v1")


def test_training_only_settings_do_not_block_loading(learned, tmp_path):
    save_snapshot(learned, tmp_path / "v1")
    torch.manual_seed(0)
    server_side = FMLoRAModel(tiny_config(prompts=PromptConfig(bank_size=4, length=4, drift_penalty=5.0)))
    load_snapshot(server_side, tmp_path / "v1")
    assert server_side.labels == learned.labels

import pytest
import torch

from fmlora.errors import PromptError, UnknownTaskError
from fmlora.model import FMLoRAModel, PromptChoice, PromptConfig
from tests.conftest import random_images, tiny_config
from tests.helpers import learn_quickly


@pytest.fixture
def learned(tiny_model: FMLoRAModel) -> FMLoRAModel:
    learn_quickly(tiny_model, "a", ["x", "y"], seed=0)
    learn_quickly(tiny_model, "b", ["z", "w"], seed=1)
    tiny_model.eval()
    return tiny_model


def test_none_equals_the_prompt_free_forward(learned):
    x = learned.preprocessor(random_images(4))
    with torch.no_grad():
        none = learned(x, "none")
        auto = learned(x, "auto")
        with learned.prompts_disabled():
            prompt_free = learned(x)
    assert torch.equal(none, prompt_free)
    assert (auto - none).abs().max() > 1e-4, "prompts had no effect"


def test_mixed_modes_in_one_batch_equal_one_at_a_time(learned):
    x = learned.preprocessor(random_images(4, seed=2))
    modes = ["auto", "none", {"task": "b"}, {"task": "a"}]
    with torch.no_grad():
        batched = learned(x, modes)
        single = torch.cat([learned(x[i : i + 1], modes[i]) for i in range(4)])
    # Batching changes float summation order only: equal to float32 precision (logits reach ~20).
    assert torch.allclose(batched, single, rtol=1e-5, atol=1e-5)


def test_task_name_selects_that_tasks_mixture(learned):
    bank = learned.prompt_bank
    x = learned.preprocessor(random_images(3, seed=4))
    with torch.no_grad():
        out_a = learned.forward_detailed(x, {"task": "a"})
        out_b = learned.forward_detailed(x, {"task": "b"})
        expected_a = bank.mixture_weights(bank.task_keys[0:1], [PromptChoice("auto")])[0]
    assert torch.allclose(out_a.prompt_weights, expected_a.expand(3, -1), atol=1e-6)
    assert not torch.allclose(out_a.prompt_weights, out_b.prompt_weights)
    assert not torch.allclose(out_a.logits, out_b.logits)


def test_auto_weights_differ_per_input_and_sum_to_one(learned):
    x = learned.preprocessor(random_images(3, seed=5))
    with torch.no_grad():
        out = learned.forward_detailed(x, "auto")
    assert torch.allclose(out.prompt_weights.sum(-1), torch.ones(3))
    assert out.nearest_task is not None and out.nearest_task.shape == (3,)


def test_unknown_task_and_bad_modes_are_typed_errors(learned):
    x = learned.preprocessor(random_images(1))
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'"):
        learned(x, {"task": "nope"})
    with pytest.raises(PromptError):
        learned(x, "sometimes")
    with pytest.raises(PromptError):
        learned(x, {"task": 3})


def test_drift_penalty_is_zero_at_task_start_and_grows_with_drift(learned):
    g = torch.Generator().manual_seed(9)
    learned.begin_task("c", "class", ["q"], 0.5, 0.5, generator=g)
    assert float(learned.prompt_bank.drift_penalty().detach()) == 0.0
    with torch.no_grad():
        learned.prompt_bank.prompts.add_(0.1)
    assert float(learned.prompt_bank.drift_penalty().detach()) > 0


def test_bank_size_is_fixed_and_block_range_defaults():
    model = FMLoRAModel(tiny_config(prompts=PromptConfig(bank_size=3, length=2)))
    assert (model.prompt_bank.start, model.prompt_bank.end) == (1, 2)
    assert tuple(model.prompt_bank.prompts.shape) == (3, 1, 2, 2, 64)
    for i in range(4):
        learn_quickly(model, f"t{i}", [f"c{i}"], seed=i)
    assert tuple(model.prompt_bank.prompts.shape) == (3, 1, 2, 2, 64)

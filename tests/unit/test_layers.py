import pytest
import torch
from torch import nn

from fmlora.errors import InjectionError
from fmlora.model import AdapterConfig, FMLoRAModel, ModelConfig, PromptConfig, create_backbone
from tests.conftest import TINY_RANDOM, random_images, tiny_config
from tests.helpers import learn_quickly


def test_fresh_adapter_equals_bare_backbone():
    torch.manual_seed(0)
    bare = create_backbone(TINY_RANDOM)
    torch.manual_seed(0)
    model = FMLoRAModel(tiny_config())
    x = model.preprocessor(random_images(4))
    with torch.no_grad():
        expected = bare.forward_head(bare.forward_features(x), pre_logits=True)
        got = model.backbone.forward_head(model.backbone.forward_features(x), pre_logits=True)
    # Bare timm model and our wrapped one share seeds, so equal weights; B = 0 keeps outputs equal.
    assert torch.equal(got, expected)


def test_first_task_starts_with_zero_update(tiny_model):
    x = tiny_model.preprocessor(random_images(3))
    before = tiny_model.backbone_features(x)
    tiny_model.begin_task("a", "class", ["x", "y"], 0.5, 0.5)
    with torch.no_grad():
        during = tiny_model.forward_detailed(x, "none").features
    assert torch.allclose(before, during, atol=1e-6)


def test_merge_equals_unmerged_and_is_idempotent(tiny_model):
    learn_quickly(tiny_model, "a", ["x", "y"])
    learn_quickly(tiny_model, "b", ["z", "w"], seed=1)
    x = tiny_model.preprocessor(random_images(5))
    frozen = {n: p.clone() for n, p in tiny_model.backbone.named_parameters() if ".base." in n}
    with torch.no_grad():
        unmerged = tiny_model(x)
        tiny_model.merge()
        merged = tiny_model(x)
        tiny_model.merge()
        merged_twice = tiny_model(x)
        tiny_model.unmerge()
        again = tiny_model(x)
    # Logits pass through the ridge head's random features: compare relative to their scale.
    assert torch.allclose(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert torch.equal(merged, merged_twice)
    assert torch.equal(again, unmerged)
    for name, param in tiny_model.backbone.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"{name} was modified"


def test_delta_weight_matches_forward_difference(tiny_model):
    learn_quickly(tiny_model, "a", ["x", "y"])
    layer = tiny_model.adapted["blocks.0.attn.qkv"]
    x = torch.randn(2, 7, layer.base.in_features)
    with torch.no_grad():
        expected = layer(x) - layer.base(x)
        got = x @ layer.get_delta_weight().T
    assert (got - expected).abs().max() < 1e-5


def test_fold_preserves_outputs(tiny_model):
    learn_quickly(tiny_model, "a", ["x", "y"])
    g = torch.Generator().manual_seed(3)
    tiny_model.begin_task("b", "class", ["z"], 0.9, 0.9, generator=g)
    with torch.no_grad():
        for p in tiny_model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    tiny_model.eval()
    x = tiny_model.preprocessor(random_images(4))
    with torch.no_grad():
        live = tiny_model(x, "none")
    tiny_model.end_task(torch.zeros(tiny_model.embed_dim), torch.zeros(tiny_model.embed_dim))
    with torch.no_grad():
        folded = tiny_model(x, "none")
    assert (live - folded).abs().max() < 1e-5
    assert all(not a.has_task for layer in tiny_model.adapted.values() for a in layer.adapters.values())


def test_default_targets_are_q_k_v_of_every_block(tiny_model):
    assert sorted(tiny_model.adapted) == [f"blocks.{i}.attn.qkv" for i in range(4)]
    assert all(sorted(layer.adapters) == ["k", "q", "v"] for layer in tiny_model.adapted.values())
    assert tiny_model.adapted_matrix_count == 12


@pytest.mark.parametrize("targets", [("attn.proj",), ("mlp.fc1", "mlp.fc2"), ("attn.qkv[v]", "attn.proj")])
def test_other_targets_are_selectable(targets):
    model = FMLoRAModel(tiny_config(adapter=AdapterConfig(rank=4, alpha=4, targets=targets)))
    suffixes = {name.split(".", 2)[2] for name in model.adapted}
    assert suffixes == {t.split("[")[0] for t in targets}
    assert all(isinstance(layer.base, nn.Linear) for layer in model.adapted.values())


def test_unknown_target_raises_injection_error():
    with pytest.raises(InjectionError, match="matches no"):
        FMLoRAModel(tiny_config(adapter=AdapterConfig(targets=("attn.nothing",))))


def test_backbone_weights_never_trainable(tiny_model):
    tiny_model.begin_task("a", "class", ["x"], 0.5, 0.5)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(".base." not in n for n in trainable)
    assert not any(n.startswith("backbone.") and "adapters" not in n for n in trainable)


def test_sequential_lora_layout_has_no_factors():
    config = ModelConfig(
        backbone=TINY_RANDOM,
        adapter=AdapterConfig(rank=4, alpha=4, task_factors=False, train_bases="every_task"),
        prompts=PromptConfig(enabled=False),
    )
    model = FMLoRAModel(config)
    model.begin_task("a", "class", ["x"], 0.5, 0.5)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("factor_" in n for n in names)
    assert any(n.endswith("lora_A") for n in names)

import time

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from fmlora.errors import BackboneError, ConfigError, WeightsNotFoundError
from fmlora.model import BackboneConfig, ModelConfig, Preprocessor, create_backbone
from tests.conftest import TINY_KWARGS, TINY_RANDOM, random_images


def _reference_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(42)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_KWARGS).state_dict()


def _assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_loads_local_safetensors_weights(tmp_path):
    state = _reference_state()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = create_backbone(TINY_RANDOM.model_copy(update={"weights": "file", "weights_path": path}))
    _assert_loaded(model, state)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_loads_local_pth_without_pickle_code(tmp_path):
    state = _reference_state()
    path = tmp_path / "w.pth"
    torch.save(state, path)
    _assert_loaded(create_backbone(TINY_RANDOM.model_copy(update={"weights": "file", "weights_path": path})), state)


def test_pth_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state": np.dtype("float32"), "obj": object}, path)
    with pytest.raises(BackboneError):
        create_backbone(TINY_RANDOM.model_copy(update={"weights": "file", "weights_path": path}))


def test_missing_or_unsupported_weight_files_are_typed_errors(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="not found"):
        create_backbone(TINY_RANDOM.model_copy(update={"weights": "file", "weights_path": tmp_path / "nope.pth"}))
    odd = tmp_path / "w.txt"
    odd.write_text("x")
    with pytest.raises(WeightsNotFoundError, match="unsupported"):
        create_backbone(TINY_RANDOM.model_copy(update={"weights": "file", "weights_path": odd}))


def test_weights_source_must_be_explicit():
    assert BackboneConfig(name="vit_small_patch16_224").weights == "pretrained"
    offline = ModelConfig().backbone  # the shipped glyph ViT when nothing else is configured
    assert offline == BackboneConfig.offline() and offline.weights == "file" and offline.input_norm == "per-image"
    with pytest.raises(ConfigError):
        BackboneConfig(weights="file")
    with pytest.raises(ConfigError):
        BackboneConfig(weights="random", weights_path="x.safetensors")


def test_pretrained_path_goes_to_timm_and_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(BackboneError, match="cannot create backbone"):
        create_backbone(BackboneConfig(name="vit_tiny_patch16_224.augreg_in21k", weights="pretrained"))
    assert time.perf_counter() - started < 20


def test_unknown_model_is_a_backbone_error():
    with pytest.raises(BackboneError):
        create_backbone(BackboneConfig(name="no_such_vit", weights="random"))


def test_preprocessing_comes_from_timm_data_config():
    model = create_backbone(TINY_RANDOM)
    pre = Preprocessor.for_model(model)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert pre.mean == tuple(cfg["mean"]) and pre.std == tuple(cfg["std"])
    assert pre.input_size == (32, 32)
    x = pre(random_images(2, size=48))
    assert x.shape == (2, 3, 32, 32)
    raw = Preprocessor.for_model(model, {"mean": (0, 0, 0), "std": (1, 1, 1)})
    white = raw(torch.full((1, 3, 32, 32), 255, dtype=torch.uint8))
    assert torch.allclose(white, torch.ones_like(white))


def test_per_image_standardisation_ignores_colour_and_polarity():
    model = create_backbone(TINY_RANDOM)
    pre = Preprocessor.for_model(model, input_norm="per-image")
    glyph = torch.zeros(1, 1, 32, 32)
    glyph[..., 10:22, 14:18] = 1.0  # a vertical stroke
    dark_on_light = ((1 - glyph) * torch.tensor([200.0, 220, 240]).view(1, 3, 1, 1)).to(torch.uint8)
    light_on_dark = (glyph * torch.tensor([90.0, 250, 30]).view(1, 3, 1, 1) + 5).to(torch.uint8)
    a, b = pre(dark_on_light), pre(light_on_dark)
    assert a.shape == (1, 3, 32, 32) and torch.allclose(a, b, atol=1e-4)
    assert a[0, 0, 15, 15] > 0 > a[0, 0, 0, 0] - 1e-6 and abs(float(a.std()) - 1) < 0.05

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmlora.errors import SnapshotCompatibilityError, SnapshotExistsError, SnapshotFormatError, SnapshotIntegrityError
from fmlora.model import BackboneConfig, FMLoRAModel, load_snapshot, read_snapshot, save_snapshot
from fmlora.model.snapshot import CONFIG_FILE, TENSOR_FILE, sha256_file
from tests.conftest import TINY_KWARGS, random_images, tiny_config
from tests.helpers import learn_quickly


@pytest.fixture
def saved(tiny_model: FMLoRAModel, tmp_path: Path) -> tuple[FMLoRAModel, Path]:
    learn_quickly(tiny_model, "a", ["x", "y"], seed=0)
    learn_quickly(tiny_model, "b", ["z"], seed=1)
    path = tmp_path / "snapshots" / "v2"
    save_snapshot(tiny_model, path, version=2, parent_version=1, card={"final_accuracy": 0.5})
    return tiny_model, path


def fresh_model() -> FMLoRAModel:
    torch.manual_seed(0)  # same backbone weights as tiny_model
    return FMLoRAModel(tiny_config())


def test_round_trip_reproduces_logits_exactly(saved):
    model, path = saved
    x = model.preprocessor(random_images(6))
    model.eval()
    with torch.no_grad():
        expected = model(x, ["auto", "none", {"task": "a"}, {"task": "b"}, "auto", "auto"])
    other = fresh_model()
    manifest = load_snapshot(other, path)
    other.eval()
    with torch.no_grad():
        got = other(x, ["auto", "none", {"task": "a"}, {"task": "b"}, "auto", "auto"])
    assert torch.equal(got, expected)
    assert other.labels == ["x", "y", "z"] and [t.name for t in other.tasks] == ["a", "b"]
    assert manifest.version == 2 and manifest.parent_version == 1 and manifest.card["final_accuracy"] == 0.5


def test_manifest_holds_the_contract_fields(saved):
    _, path = saved
    manifest = json.loads((path / CONFIG_FILE).read_text())
    for key in (
        "format_version",
        "library_version",
        "backbone",
        "adapter",
        "labels",
        "tasks",
        "parent_version",
        "created_at",
        "tensors_sha256",
        "card",
    ):
        assert key in manifest
    assert manifest["tensors_sha256"] == sha256_file(path / TENSOR_FILE)
    assert manifest["tasks"][0]["rank"] >= 1 and "complexity" in manifest["tasks"][0]
    assert b"pickle" not in (path / TENSOR_FILE).read_bytes()[:64]


def _state(model: FMLoRAModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: FMLoRAModel, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_flipped_byte_raises_integrity_error_before_touching_the_model(saved):
    _, path = saved
    data = bytearray((path / TENSOR_FILE).read_bytes())
    data[-5] ^= 0x01
    (path / TENSOR_FILE).write_bytes(bytes(data))
    target = fresh_model()
    before = _state(target)
    with pytest.raises(SnapshotIntegrityError, match="corrupt"):
        load_snapshot(target, path)
    assert _unchanged(target, before) and target.tasks == []


def test_missing_tensor_raises_format_error_before_touching_the_model(saved):
    _, path = saved
    tensors = load_file(str(path / TENSOR_FILE))
    del tensors["prompts.keys"]
    save_file(tensors, str(path / TENSOR_FILE))
    manifest = json.loads((path / CONFIG_FILE).read_text())
    manifest["tensors_sha256"] = sha256_file(path / TENSOR_FILE)  # a consistent but incomplete snapshot
    (path / CONFIG_FILE).write_text(json.dumps(manifest))
    target = fresh_model()
    before = _state(target)
    with pytest.raises(SnapshotFormatError, match="missing"):
        load_snapshot(target, path)
    assert _unchanged(target, before)


def test_different_backbone_raises_compatibility_error(saved):
    _, path = saved
    torch.manual_seed(1)  # same architecture, other weights
    other = FMLoRAModel(tiny_config())
    before = _state(other)
    with pytest.raises(SnapshotCompatibilityError, match="backbone"):
        load_snapshot(other, path)
    assert _unchanged(other, before)
    wider = BackboneConfig(name="vit_tiny_patch16_224", weights="random", model_kwargs={**TINY_KWARGS, "depth": 3})
    with pytest.raises(SnapshotCompatibilityError):
        load_snapshot(FMLoRAModel(tiny_config(backbone=wider)), path)


def test_bad_manifest_and_missing_files_are_format_errors(saved, tmp_path):
    _, path = saved
    with pytest.raises(SnapshotFormatError):
        read_snapshot(tmp_path / "nowhere")
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(SnapshotFormatError):
        read_snapshot(path)


def test_publishing_is_atomic_and_never_overwrites(saved):
    model, path = saved
    with pytest.raises(SnapshotExistsError):
        save_snapshot(model, path)
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [] and sorted(p.name for p in path.iterdir()) == sorted([TENSOR_FILE, CONFIG_FILE])


def test_failed_write_leaves_nothing_behind(tiny_model, tmp_path, monkeypatch):
    learn_quickly(tiny_model, "a", ["x"])

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("fmlora.model.snapshot.save_file", broken)
    with pytest.raises(OSError):
        save_snapshot(tiny_model, tmp_path / "v1")
    assert list(tmp_path.iterdir()) == []


def test_solved_rows_travel_in_float16_and_load_exactly_into_a_float32_row_model(tiny_model, tmp_path):
    learn_quickly(tiny_model, "a", ["x", "y", "z"], seed=0)
    solved = torch.randn(3, tiny_model.head.row_features, generator=torch.Generator().manual_seed(3))
    tiny_model.head.set_rows(solved)
    path = tmp_path / "v1"
    manifest = save_snapshot(tiny_model, path, version=1)
    assert load_file(str(path / TENSOR_FILE))["head.weight"].dtype == torch.float16
    # The storage precision is not part of the layout: a model that keeps float32 rows loads it.
    assert "solved_row_dtype" not in manifest.adapter["head"]
    torch.manual_seed(0)
    other = FMLoRAModel(tiny_config(head=tiny_model.config.head.model_copy(update={"solved_row_dtype": "float32"})))
    load_snapshot(other, path)
    x = tiny_model.preprocessor(random_images(4))
    tiny_model.eval()
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(x, ["auto"] * 4), tiny_model(x, ["auto"] * 4))

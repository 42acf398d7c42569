"""Per-version worker state: stored beside the snapshot before the row, verified on read, rolled back
with its version; and a publish whose store is unreachable records nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmlora.errors import StoreUnavailableError, WorkerStateError, WorkerStateIntegrityError
from fmlora.model import FMLoRAModel
from fmlora.registry import Registry, S3Options, publish_version
from tests.conftest import tiny_config
from tests.helpers import learn_quickly
from tests.integration.registry.services import MotoS3, registry_url, s3_bucket  # noqa: F401 - fixtures


@pytest.fixture
def registry(tmp_path: Path, registry_url: str | None) -> Registry:  # noqa: F811
    return Registry.open(tmp_path / "home", tiny_config(), registry_url=registry_url)


def stats(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"class_means": torch.randn(4, 8, generator=g), "counts": torch.arange(4)}


def publish_with_state(registry: Registry, model: FMLoRAModel, task: str, seed: int) -> int:
    learn_quickly(model, task, [f"{task}-a", f"{task}-b"], seed=seed)
    return publish_version(
        registry,
        model,
        card={},
        parent=registry.live_version(),
        worker_state=stats(seed),
        worker_state_meta={"seen": seed, "task": task},
    ).version


def test_state_is_published_read_back_and_rolled_back(registry: Registry, tiny_model: FMLoRAModel) -> None:
    v1 = publish_with_state(registry, tiny_model, "one", 1)
    v2 = publish_with_state(registry, tiny_model, "two", 2)
    info = registry.get_version(v2)
    assert (
        info.worker_state_sha256 is not None
        and info.worker_state_sha256 != registry.get_version(v1).worker_state_sha256
    )
    state = registry.read_worker_state(v2)
    assert state.meta == {"seen": 2, "task": "two"}
    assert torch.equal(state.tensors["class_means"], stats(2)["class_means"])
    assert torch.equal(state.tensors["counts"], torch.arange(4))
    # The next task starts from the live version's state: after a rollback, the older one.
    registry.activate(v1)
    assert registry.read_worker_state(registry.live_version()).meta["seen"] == 1
    learn_quickly(tiny_model, "three", ["x", "y"], seed=3)
    plain = publish_version(registry, tiny_model, card={}, parent=v1).version
    assert registry.read_worker_state(plain) is None  # a version published without state has none


def test_a_corrupted_state_is_refused(registry: Registry, tiny_model: FMLoRAModel, tmp_path: Path) -> None:
    v1 = publish_with_state(registry, tiny_model, "one", 1)
    tampered = tmp_path / "state.safetensors"
    from fmlora.registry.worker_state import write_worker_state

    write_worker_state(tampered, {"class_means": torch.zeros(4, 8), "counts": torch.arange(4)}, {"seen": 1})
    registry.store.put_file(f"snapshots/v{v1}/worker_state.safetensors", tampered)
    with pytest.raises(WorkerStateIntegrityError, match="corrupt"):
        registry.read_worker_state(v1)
    registry.store.delete(f"snapshots/v{v1}/worker_state.safetensors")
    with pytest.raises(WorkerStateError, match="missing"):
        registry.read_worker_state(v1)


def test_state_on_s3(tmp_path: Path, s3_bucket: tuple[MotoS3, str], tiny_model: FMLoRAModel) -> None:  # noqa: F811
    server, bucket = s3_bucket
    registry = Registry.open(tmp_path / "home", tiny_config(), store_url=f"s3://{bucket}/r", s3=server.options())
    v1 = publish_with_state(registry, tiny_model, "one", 5)
    assert registry.read_worker_state(v1).meta["seen"] == 5
    keys = [o.key for o in registry.store.list(f"snapshots/v{v1}")]
    assert keys == [
        f"snapshots/v{v1}/{n}" for n in ("adapter_config.json", "adapter_model.safetensors", "worker_state.safetensors")
    ]


def test_store_unreachable_during_publish_records_nothing(
    tmp_path: Path,
    s3_bucket: tuple[MotoS3, str],  # noqa: F811
    tiny_model: FMLoRAModel,
) -> None:
    server, bucket = s3_bucket
    registry = Registry.open(tmp_path / "home", tiny_config(), store_url=f"s3://{bucket}/r", s3=server.options())
    v1 = publish_with_state(registry, tiny_model, "one", 1)
    # The endpoint goes away (a port nobody listens on) between start-up and the publish.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    from fmlora.registry.store import S3Store

    registry.store = S3Store(
        bucket, "r", S3Options(**{**server.options().__dict__, "endpoint_url": f"http://127.0.0.1:{dead}"})
    )
    learn_quickly(tiny_model, "two", ["x", "y"], seed=2)
    with pytest.raises(StoreUnavailableError, match="cannot be reached"):
        publish_version(registry, tiny_model, card={}, parent=v1, worker_state=stats(2))
    assert [v.version for v in registry.list_versions()] == [v1] and registry.live_version() == v1
    assert [e.kind for e in registry.events()] == ["published"]
    assert list(registry.scratch_dir.iterdir()) == []  # the local staging is gone too
    registry.store = Registry.open(tmp_path / "home", store_url=f"s3://{bucket}/r", s3=server.options()).store
    assert publish_with_state(registry, tiny_model, "three", 3) == v1 + 2  # the failed number is never reused

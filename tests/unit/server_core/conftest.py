"""Fixtures for the serving core: a real registry, a trainer that publishes tiny versions, engines."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fmlora.model import FMLoRAModel
from fmlora.model.config import ModelConfig
from fmlora.model.snapshot import TENSOR_FILE
from fmlora.registry.publish import publish_version
from fmlora.registry.registry import Registry
from server.core.engine import Engine, EngineConfig, SourceFactory
from tests.conftest import tiny_config
from tests.helpers import learn_quickly

BACKBONE_SEED = 0


def seeded_model(config: ModelConfig, seed: int = BACKBONE_SEED) -> FMLoRAModel:
    """Random tiny backbones are equal (same fingerprint) when built under the same seed."""
    torch.manual_seed(seed)
    return FMLoRAModel(config)


class Publisher:
    """Plays the worker: learns tasks on a trainer model and publishes versions to the registry."""

    def __init__(self, home: Path, config: ModelConfig):
        self.config = config
        self.registry = Registry.open(home, config)
        self.trainer = seeded_model(config)
        self.next_task = 0

    def learn(self, name: str, classes: list[str]) -> None:
        learn_quickly(self.trainer, name, classes, seed=self.next_task)
        self.next_task += 1

    def publish(
        self, model: FMLoRAModel | None = None, *, accepted: bool = True, tamper: Callable[[int], None] | None = None
    ) -> int:
        """Publish a version through ``publish_version`` (live when ``accepted``); ``tamper(version)``
        damages the stored files after they were hashed and before the registry records them, so no
        reader can see the good files first."""
        model = model or self.trainer

        def hook(stage: str, version: int) -> None:
            if stage == "written" and tamper is not None:
                tamper(version)

        info = publish_version(
            self.registry, model, card={}, parent=self.registry.live_version(), accepted=accepted, hook=hook
        )
        return info.version

    def learn_and_publish(self, name: str, classes: list[str]) -> int:
        self.learn(name, classes)
        return self.publish()

    def tensor_file(self, version: int) -> Path:
        return self.registry.snapshot_dir(version) / TENSOR_FILE

    def corrupt(self, version: int) -> None:
        """Flip bytes in the middle of the tensor file (sha256 no longer matches)."""
        path = self.tensor_file(version)
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
        os.chmod(path, 0o644)
        path.write_bytes(bytes(data))

    def truncate(self, version: int) -> None:
        path = self.tensor_file(version)
        data = path.read_bytes()
        os.chmod(path, 0o644)
        path.write_bytes(data[: len(data) // 3])


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    return Publisher(tmp_path / "home", tiny_config())


@pytest.fixture
def make_engine(publisher: Publisher) -> Iterator:
    engines: list[Engine] = []

    def make(source: SourceFactory | None = None, **overrides: object) -> Engine:
        fields: dict[str, object] = {"device": "cpu", "poll_interval_s": 0.02, "max_wait_ms": 2.0}
        fields.update(overrides)
        model = seeded_model(publisher.config)
        engine = Engine(publisher.registry, EngineConfig(**fields), model=model, source=source)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop(timeout_s=5)


def image(seed: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)

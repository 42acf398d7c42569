"""``fmlora worker``'s training knobs reach the worker's TrainConfig (flags and FMLORA_WORKER_* variables)."""

from typing import ClassVar

import pytest
from typer.testing import CliRunner

import fmlora.worker
from fmlora.cli import app
from fmlora.training.config import TrainConfig


class _Captured:
    configs: ClassVar[list] = []

    def __init__(self, registry, config):
        self.id = "captured"
        _Captured.configs.append(config)

    def stop(self) -> None:
        pass

    def run_forever(self, *, exit_when_idle: bool = False) -> None:
        pass


@pytest.fixture
def captured(monkeypatch):
    _Captured.configs = []
    monkeypatch.setattr(fmlora.worker, "Worker", _Captured)
    return _Captured.configs


def test_statistics_views_come_from_the_environment_or_the_default(tmp_path, captured):
    home = str(tmp_path / "home")
    result = CliRunner().invoke(app, ["worker", "--home", home], env={"FMLORA_WORKER_STATISTICS_VIEWS": "3"})
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["worker", "--home", home], env={"FMLORA_WORKER_STATISTICS_VIEWS": None})
    assert result.exit_code == 0, result.output
    assert [c.train.statistics_views for c in captured] == [3, 0] == [3, TrainConfig().statistics_views]


def test_a_negative_number_of_views_is_refused(tmp_path, captured):
    result = CliRunner().invoke(app, ["worker", "--home", str(tmp_path / "h"), "--statistics-views", "-1"])
    assert result.exit_code == 2 and not captured


def test_folding_in_held_out_images_is_on_unless_turned_off(tmp_path, captured):
    home = str(tmp_path / "home")
    for args, env in (
        ([], {"FMLORA_WORKER_FOLD_IN_HELD_OUT": None}),
        (["--no-fold-in-held-out"], {}),
        ([], {"FMLORA_WORKER_FOLD_IN_HELD_OUT": "false"}),
    ):
        result = CliRunner().invoke(app, ["worker", "--home", home, *args], env=env)
        assert result.exit_code == 0, result.output
    assert [c.fold_in_held_out for c in captured] == [True, False, False]

"""``fmlora demo``'s own lifecycle: the temporary home it makes for its server goes when it ends.

Starting a real server and training is the e2e quickstart's job; here the server process and the
measured run are stand-ins so that what is checked is only what the command does around them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import fmlora_demo.demo as demo_module


class _StoppedServer:
    returncode = 0

    def poll(self) -> int:
        return 0


@pytest.fixture
def demo_app(monkeypatch, tmp_path):
    homes: list[Path] = []

    def fake_start_server(home, port, admin_key, log_path):
        (home / "snapshots").mkdir(parents=True, exist_ok=True)
        (home / "snapshots" / "adapter-v1.safetensors").write_bytes(b"x" * 64)
        homes.append(home)
        return _StoppedServer()

    monkeypatch.setattr(demo_module, "start_server", fake_start_server)
    monkeypatch.setattr(demo_module, "stop_server", lambda process, timeout=30.0: 0)
    monkeypatch.setattr(demo_module, "run_demo", lambda *args, **kwargs: None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    app = typer.Typer()
    demo_module.register(app)

    @app.command()
    def _unused() -> None:  # a second command keeps typer from collapsing the app into ``demo``
        pass

    return app, homes


def _run(app, *args: str):
    return CliRunner().invoke(app, ["demo", *args])


def test_the_home_it_made_is_removed_when_it_ends(demo_app, tmp_path):
    app, homes = demo_app
    result = _run(app, "--out", str(tmp_path / "out"), "--tasks", "1")
    assert result.exit_code == 0, result.output
    assert len(homes) == 1 and homes[0].name.startswith("fmlora-demo-home-")
    assert not homes[0].exists()


def test_keep_home_keeps_it_and_says_where(demo_app, tmp_path):
    app, homes = demo_app
    result = _run(app, "--out", str(tmp_path / "out"), "--keep-home")
    assert result.exit_code == 0, result.output
    assert (homes[0] / "snapshots" / "adapter-v1.safetensors").is_file()
    assert f"kept the server's home {homes[0]}" in result.output


def test_a_home_the_user_named_is_never_removed(demo_app, tmp_path):
    app, homes = demo_app
    result = _run(app, "--out", str(tmp_path / "out"), "--home", str(tmp_path / "mine"))
    assert result.exit_code == 0, result.output
    assert homes == [tmp_path / "mine"] and (tmp_path / "mine" / "snapshots").is_dir()


def test_the_home_is_removed_when_the_run_fails_too(demo_app, monkeypatch, tmp_path):
    app, homes = demo_app

    def failing_run(*args, **kwargs):
        raise RuntimeError("the server went away")

    monkeypatch.setattr(demo_module, "run_demo", failing_run)
    result = _run(app, "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "the server went away" in result.output and not homes[0].exists()

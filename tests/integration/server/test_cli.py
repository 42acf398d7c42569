"""``fmlora serve`` pieces that need no running server: the admin key file, registration, bad input."""

from __future__ import annotations

import os
import socket
import stat

import pytest
import typer
from typer.testing import CliRunner

from server.cli import ADMIN_KEY_FILE, load_or_create_admin_key, register


def test_admin_key_is_generated_once_with_mode_0600(tmp_path):
    key, created = load_or_create_admin_key(tmp_path / "home")
    path = tmp_path / "home" / ADMIN_KEY_FILE
    assert created and len(key) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = load_or_create_admin_key(tmp_path / "home")
    assert again == key and not created_again


def test_a_key_file_readable_by_others_is_tightened(tmp_path):
    load_or_create_admin_key(tmp_path)
    path = tmp_path / ADMIN_KEY_FILE
    os.chmod(path, 0o644)
    load_or_create_admin_key(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_broken_key_file_is_refused(tmp_path):
    (tmp_path / ADMIN_KEY_FILE).write_text("x")
    os.chmod(tmp_path / ADMIN_KEY_FILE, 0o600)
    with pytest.raises(Exception, match="delete it"):
        load_or_create_admin_key(tmp_path)


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:  # a second command keeps `serve` a subcommand
        pass

    return app


def test_serve_refuses_a_busy_port_and_bad_settings(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("FMLORA_ADMIN_KEY", "cli-admin-key-0123456789")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", "--home", str(tmp_path / "h"), "--port", str(port), "--no-worker"])
    assert result.exit_code == 2
    assert "cannot listen" in result.output
    result = CliRunner().invoke(cli, ["serve", "--home", str(tmp_path / "h"), "--device", "tpu"])
    assert result.exit_code == 2 and "device" in result.output
    monkeypatch.setenv("FMLORA_ADMIN_KEY", "short")
    result = CliRunner().invoke(cli, ["serve", "--home", str(tmp_path / "h")])
    assert result.exit_code == 2 and "short" not in result.output

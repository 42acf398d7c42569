"""The artifact store on a directory and on a real S3 endpoint (moto's server, the real boto3 client),
and start-up errors that name the setting: malformed URLs, refused credentials, unreachable services."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fmlora.errors import (
    ConfigError,
    ObjectIntegrityError,
    ObjectNotFoundError,
    RegistryConfigError,
    RegistryUnavailableError,
    StoreConfigError,
    StoreUnavailableError,
)
from fmlora.registry import ArtifactStore, Registry, open_registry, open_store
from tests.conftest import tiny_config
from tests.integration.registry.services import MotoS3, postgres_cluster, s3_bucket  # noqa: F401 - fixture


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "file":
        return open_store(None, tmp_path / "home")
    server, bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/some/prefix", tmp_path, server.options())


def test_put_get_list_delete_with_sha256(store: ArtifactStore, tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(3 * 2**20 + 7))  # more than one chunk
    expected = hashlib.sha256(blob.read_bytes()).hexdigest()
    assert store.put_file("tasks/a.tar", blob) == expected and blob.exists()
    store.get_file("tasks/a.tar", tmp_path / "out" / "a.tar", expected)
    assert (tmp_path / "out" / "a.tar").read_bytes() == blob.read_bytes()
    with pytest.raises(ObjectIntegrityError, match="corrupt"):
        store.get_file("tasks/a.tar", tmp_path / "bad.tar", "0" * 64)
    assert not (tmp_path / "bad.tar").exists()  # refused bytes never land at the destination

    folder = tmp_path / "v1"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"tensors")
    (folder / "adapter_config.json").write_bytes(b"{}")
    hashes = store.put_dir("snapshots/v1", folder, consume=True)
    assert hashes["adapter_config.json"] == hashlib.sha256(b"{}").hexdigest()
    assert [o.key for o in store.list("snapshots")] == [
        "snapshots/v1/adapter_config.json",
        "snapshots/v1/adapter_model.safetensors",
    ]
    assert store.read_bytes("snapshots/v1/adapter_model.safetensors", hashes["adapter_model.safetensors"]) == b"tensors"
    store.delete_prefix("snapshots/v1")
    store.delete("tasks/a.tar")
    assert store.list("snapshots") == [] and store.list("tasks") == []
    with pytest.raises(ObjectNotFoundError):
        store.read_bytes("tasks/a.tar")


def test_get_files_fetches_every_object_and_refuses_a_changed_one(store: ArtifactStore, tmp_path: Path) -> None:
    """Several objects at once (overlapped on S3): all arrive verified; one whose sha256 differs is
    refused and never lands, while the others still arrive, and a missing one is an error too."""
    blobs = {f"snapshots/v9/{name}": os.urandom(1000 + i) for i, name in enumerate(("a.bin", "b.bin", "c.bin"))}
    hashes = {}
    for key, data in blobs.items():
        source = tmp_path / "src" / key
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(data)
        hashes[key] = store.put_file(key, source)
    out = tmp_path / "out"
    store.get_files({key: (out / key.rsplit("/", 1)[1], hashes[key]) for key in blobs})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {k.rsplit("/", 1)[1]: v for k, v in blobs.items()}

    bad = tmp_path / "bad"
    wanted = {key: (bad / key.rsplit("/", 1)[1], hashes[key]) for key in blobs}
    wanted["snapshots/v9/b.bin"] = (bad / "b.bin", "0" * 64)
    with pytest.raises(ObjectIntegrityError):
        store.get_files(wanted)
    assert sorted(p.name for p in bad.iterdir()) == ["a.bin", "c.bin"]
    with pytest.raises(ObjectNotFoundError):
        store.get_files({"snapshots/v9/a.bin": (tmp_path / "x", None), "snapshots/v9/gone": (tmp_path / "y", None)})


def test_keys_cannot_escape(store: ArtifactStore, tmp_path: Path) -> None:
    from fmlora.errors import StoreError

    (tmp_path / "x").write_bytes(b"x")
    for key in ("../x", "/abs", "tasks/../../x", "tasks/.hidden", ""):
        with pytest.raises(StoreError, match="invalid object key"):
            store.put_file(key, tmp_path / "x")


def test_a_registry_on_s3_publishes_fetches_and_verifies(
    tmp_path: Path,
    s3_bucket: tuple[MotoS3, str],  # noqa: F811
    tiny_model,
) -> None:
    from fmlora.registry import publish_version
    from tests.helpers import learn_quickly

    server, bucket = s3_bucket
    registry = Registry.open(tmp_path / "home", tiny_config(), store_url=f"s3://{bucket}/reg", s3=server.options())
    learn_quickly(tiny_model, "one", ["a", "b"])
    info = publish_version(registry, tiny_model, card={}, parent=None)
    assert not (tmp_path / "home" / "snapshots").exists()  # the objects went to the bucket only
    local = registry.fetch_version(info.version)
    assert local == registry.snapshot_dir(info.version) and (local / "adapter_config.json").is_file()
    # A replica on another host (another HOME) reads the same version from the store.
    other = Registry.open(
        tmp_path / "other",
        registry_url=f"sqlite:///{registry.db_path}",
        store_url=f"s3://{bucket}/reg",
        s3=server.options(),
    )
    assert (other.fetch_version(info.version) / "adapter_model.safetensors").read_bytes() == (
        local / "adapter_model.safetensors"
    ).read_bytes()
    # Bytes changed in the bucket are refused, and a damaged local copy is fetched again.
    (local / "adapter_config.json").write_text("{}")
    assert registry.fetch_version(info.version) == local and (local / "adapter_config.json").read_text() != "{}"
    bogus = tmp_path / "bogus.json"
    bogus.write_text("{}")
    registry.store.put_file(f"snapshots/v{info.version}/adapter_config.json", bogus)
    import shutil

    shutil.rmtree(local)
    with pytest.raises(ObjectIntegrityError):
        registry.fetch_version(info.version)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("mysql://x@y/z", "unknown scheme"),
        ("sqlite:relative.db", "expected sqlite:///"),
        ("sqlite:///no/such/folder/registry.db", "does not exist"),
        ("postgresql://u@host:notaport/db", "not a valid PostgreSQL URL"),
        ("postgresql://u@127.0.0.1:5432", "names no database"),
    ],
)
def test_malformed_registry_url_names_the_setting(tmp_path: Path, url: str, words: str) -> None:
    with pytest.raises(RegistryConfigError, match=words) as info:
        open_registry(url, tmp_path, tiny_config())
    assert "FMLORA_REGISTRY_URL" in str(info.value) and isinstance(info.value, ConfigError)


def test_refused_or_unreachable_postgres_names_the_setting(tmp_path: Path) -> None:
    cluster = postgres_cluster()
    with pytest.raises(RegistryConfigError, match=r"FMLORA_REGISTRY_URL.*refused") as info:
        open_registry(cluster.url("postgres", user="nobody"), tmp_path, tiny_config())
    assert "nobody" in str(info.value)
    with pytest.raises(RegistryConfigError, match="refused"):
        open_registry(cluster.url("no_such_db"), tmp_path, tiny_config())
    with pytest.raises(RegistryUnavailableError, match=r"FMLORA_REGISTRY_URL.*cannot be reached"):
        open_registry(f"postgresql://postgres:secret@127.0.0.1:{_free_port()}/x", tmp_path, tiny_config())
    with pytest.raises(RegistryConfigError) as hidden:
        open_registry("postgresql://u:hunter2@h:bad/db", tmp_path, tiny_config())
    assert "hunter2" not in str(hidden.value)  # a password is never printed


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://bucket", "unknown scheme"),
        ("file://relative", "absolute path"),
        ("s3://", "names no bucket"),
        ("s3://key:secret@bucket/p", "credentials never go in the URL"),
        ("s3://bucket/p?colour=red", "may follow"),
    ],
)
def test_malformed_store_url_names_the_setting(tmp_path: Path, url: str, words: str) -> None:
    with pytest.raises(StoreConfigError, match=words) as info:
        open_store(url, tmp_path)
    assert "FMLORA_STORE_URL" in str(info.value)


def test_s3_missing_bucket_wrong_credentials_and_unreachable(
    tmp_path: Path,
    s3_bucket: tuple[MotoS3, str],  # noqa: F811
) -> None:
    server, bucket = s3_bucket
    with pytest.raises(StoreConfigError, match=r"FMLORA_STORE_URL.*does not exist"):
        open_store("s3://no-such-bucket/p", tmp_path, server.options())
    from moto import settings

    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # the endpoint now checks credentials
    try:
        with pytest.raises(StoreConfigError, match=r"FMLORA_STORE_URL.*refused the credentials"):
            open_store(f"s3://{bucket}/p", tmp_path, server.options(access_key_id="wrong", secret_access_key="x"))
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = before
    with pytest.raises(StoreUnavailableError, match=r"FMLORA_STORE_URL.*cannot be reached"):
        open_store(f"s3://{bucket}/p", tmp_path, server.options(endpoint_url=f"http://127.0.0.1:{_free_port()}"))


def test_the_worker_command_takes_the_urls_and_refuses_a_bad_one_at_start_up(
    tmp_path: Path,
    s3_bucket: tuple[MotoS3, str],  # noqa: F811
) -> None:
    import subprocess
    import sys

    server, bucket = s3_bucket
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FMLORA_STORE_URL": f"s3://{bucket}/w?endpoint_url={server.endpoint}&addressing_style=path",
    }
    command = [sys.executable, "-m", "fmlora.cli", "worker", "--home", str(tmp_path / "h"), "--exit-when-idle"]
    ok = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert f"objects in s3://{bucket}/w" in ok.stderr
    bad = subprocess.run(
        [*command, "--registry-url", "postgresql://u@h:x/db"], env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "FMLORA_REGISTRY_URL" in bad.stderr and "Traceback" not in bad.stderr

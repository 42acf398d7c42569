"""Real services for the registry's tests: a throwaway PostgreSQL 15 cluster and an S3 endpoint (moto's
server mode), each started once per test process and stopped at exit.

PostgreSQL: ``initdb``/``pg_ctl`` from PATH, run as the ``postgres`` user when the tests run as root
(initdb refuses root), data and socket in a temporary directory that user owns, ``-A trust``, a free
port on 127.0.0.1. Each test gets a database of its own. Under ``CI=true`` a PostgreSQL that cannot
start fails the test; elsewhere the PostgreSQL half of a parametrised test is skipped with the reason.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fmlora.registry.store import S3Options

BACKENDS = ("sqlite", "postgresql")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    def __init__(self) -> None:
        missing = [tool for tool in ("initdb", "pg_ctl") if shutil.which(tool) is None]
        if missing:
            raise RuntimeError(f"{missing} not on PATH (install PostgreSQL 15: apt-get install postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="fmlora-pg-"))
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.port = _free_port()
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        self.options = options
        self.start()
        atexit.register(self.stop)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-o", self.options, "-l", str(self.root / "log"), "-w", "start")

    def pause(self) -> None:
        """Stop the server (data kept): clients see connections refused until ``start()``."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        result = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"{command[0]} failed: {result.stderr[-2000:]} {log[-2000:]}")

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        from fmlora.registry.postgres import close_pools

        close_pools(self.url(name))
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        if self.data.exists():
            prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
            command = [*prefix, "pg_ctl", "-D", str(self.data), "-m", "immediate", "stop"]
            subprocess.run(command, capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


@functools.cache
def _cluster() -> PostgresCluster | str:
    try:
        return PostgresCluster()
    except Exception as exc:  # reported by the fixture: fail under CI, skip elsewhere
        return f"PostgreSQL could not start: {exc}"


def postgres_cluster() -> PostgresCluster:
    cluster = _cluster()
    if isinstance(cluster, str):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(cluster)
        pytest.skip(cluster)
    return cluster


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty database on the shared throwaway cluster."""
    cluster = postgres_cluster()
    name = cluster.create_database()
    try:
        yield cluster.url(name)
    finally:
        cluster.drop_database(name)


@pytest.fixture(params=BACKENDS)
def registry_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None (SQLite in HOME, the embedded default) or the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
        return
    cluster = postgres_cluster()
    name = cluster.create_database()
    try:
        yield cluster.url(name)
    finally:
        cluster.drop_database(name)


class MotoS3:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        atexit.register(self.server.stop)

    def options(self, **overrides: object) -> S3Options:
        fields = {
            "endpoint_url": self.endpoint,
            "region": "us-east-1",
            "access_key_id": "testing",
            "secret_access_key": "testing",
            "addressing_style": "path",
            "max_attempts": 1,
            "connect_timeout_s": 2.0,
        }
        fields.update(overrides)
        return S3Options(**fields)  # type: ignore[arg-type]

    def create_bucket(self) -> str:
        import boto3
        from botocore.config import Config

        name = f"fmlora-{uuid.uuid4().hex[:10]}"
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(s3={"addressing_style": "path"}),
        )
        client.create_bucket(Bucket=name)
        return name


@functools.cache
def moto_s3() -> MotoS3:
    return MotoS3()


@pytest.fixture
def s3_bucket() -> tuple[MotoS3, str]:
    """The shared S3 endpoint and a new, empty bucket on it."""
    server = moto_s3()
    return server, server.create_bucket()

"""benchmarks.publish: homes and versions made without training, all through publish_version. Every bad
kind is recorded as the live version with files that a server's load (read and verify, compare with
the registry's row, check against the model) refuses, while the good version before it still loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.publish import BAD_KINDS, Publisher, make_home
from fmlora.errors import SnapshotCompatibilityError, SnapshotFormatError, SnapshotIntegrityError
from fmlora.model.snapshot import check_compatible, read_snapshot

REFUSED_WITH = {
    "corrupt": SnapshotIntegrityError,
    "truncated": SnapshotFormatError,
    "incompatible": SnapshotCompatibilityError,
    "wrong_shape": SnapshotFormatError,
    "nonfinite": SnapshotFormatError,
    "missing_file": SnapshotFormatError,
}


def load_as_a_server_would(publisher: Publisher, version: int) -> None:
    registry = publisher.registry
    snapshot = read_snapshot(registry.snapshot_dir(version))
    if snapshot.manifest.tensors_sha256 != registry.get_version(version).sha256:
        raise SnapshotIntegrityError(f"v{version}'s tensors differ from the registry's record")
    check_compatible(snapshot, publisher.model)


@pytest.fixture(scope="module")
def publisher(tmp_path_factory: pytest.TempPathFactory) -> Publisher:
    return make_home(tmp_path_factory.mktemp("publish") / "home", "tiny", tasks=2, classes_per_task=3)


def test_make_home_publishes_each_task_live_in_turn(publisher: Publisher) -> None:
    registry = publisher.registry
    rows = registry.list_versions()
    assert [(v.version, len(v.tasks), v.state) for v in sorted(rows, key=lambda v: v.version)] == [
        (1, 1, "retired"),
        (2, 2, "live"),
    ]
    assert publisher.good_versions == [1, 2] and len(publisher.model.labels) == 6
    assert Path(registry.model_config.backbone.weights_path).is_file()  # the server builds the same backbone
    for version in (1, 2):
        load_as_a_server_would(publisher, version)


def test_a_refresh_keeps_the_tasks_and_size_and_changes_the_bytes(publisher: Publisher) -> None:
    before = publisher.registry.live()
    after = publisher.publish(new_task=False)
    row = publisher.registry.get_version(after.version)
    assert after.kind == "refresh" and after.good and publisher.registry.live_version() == after.version
    assert row.tasks == before.tasks and row.adapter_bytes == before.adapter_bytes and row.sha256 != before.sha256


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_each_bad_kind_is_live_and_refused_on_load(publisher: Publisher, kind: str) -> None:
    good = publisher.publish(new_task=False)
    bad = publisher.publish_bad(kind)
    assert (bad.kind, bad.good, bad.version) == (kind, False, good.version + 1)
    assert publisher.registry.live_version() == bad.version and bad.version in publisher.bad_versions
    load_as_a_server_would(publisher, good.version)
    with pytest.raises(REFUSED_WITH[kind]):
        load_as_a_server_would(publisher, bad.version)


def test_an_unknown_bad_kind_publishes_nothing(publisher: Publisher) -> None:
    live = publisher.registry.live_version()
    with pytest.raises(ValueError, match="unknown bad snapshot kind"):
        publisher.publish_bad("gremlins")
    assert publisher.registry.live_version() == live

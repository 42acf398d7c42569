"""Task intake: good archives are stored and queued; every malicious or malformed one is refused
with a typed error and leaves nothing behind."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmlora.errors import (
    ArchiveFormatError,
    ArchiveTooLargeError,
    ClassLayoutError,
    IntakeError,
    InvalidImageError,
    TaskConflictError,
    UnsafeArchiveError,
)
from fmlora.registry import fetch_task
from fmlora.registry.intake import IntakeLimits, read_task_files, submit_task
from fmlora.registry.registry import Registry
from tests.conftest import tiny_config
from tests.integration.registry.services import registry_url  # noqa: F401 - fixture


def png(seed: int = 0, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def good_members(classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 5) -> dict[str, bytes]:
    return {f"{c}/{i}.png": png(hash((c, i)) % 1000) for c in classes for i in range(per_class)}


@pytest.fixture
def registry(tmp_path: Path, registry_url: str | None) -> Registry:  # noqa: F811
    return Registry.open(tmp_path / "home", tiny_config(), registry_url=registry_url)


def stored_objects(registry: Registry) -> list[str]:
    return [o.key for o in registry.store.list("tasks")]


def stored_nothing(registry: Registry) -> bool:
    leftovers = [p for p in registry.scratch_dir.iterdir()] + [p for p in registry.home.glob("tasks/.*")]
    return registry.list_tasks() == [] and stored_objects(registry) == [] and leftovers == []


def test_good_zip_is_split_stored_and_queued(registry: Registry, tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "t.zip", good_members(per_class=10))
    task = submit_task(registry, archive, name="pets", kind="class")
    assert task.status == "queued" and task.classes == ["cat", "dog"]
    assert (task.num_train, task.num_eval) == (16, 4)  # 20 % held out per class
    assert stored_objects(registry) == [f"tasks/{task.id}.tar"] and task.archive_bytes > 0
    assert registry.store.read_bytes(f"tasks/{task.id}.tar", task.archive_sha256)  # verified by its sha256
    files = read_task_files(registry, task.id)
    assert len(files.train) == 16 and len(files.eval) == 4
    assert {c for _, c in files.eval} == {"cat", "dog"}
    assert all(p.is_file() for p, _ in files.train + files.eval)
    assert not set(files.train) & set(files.eval)


def test_split_is_deterministic(tmp_path: Path) -> None:
    def eval_sources(home: str) -> list[str]:
        reg = Registry.open(tmp_path / home, tiny_config())
        task = submit_task(reg, make_zip(tmp_path / f"{home}.zip", good_members(per_class=10)), name="p", kind="class")
        import json

        manifest = json.loads((fetch_task(reg, task.id) / "task.json").read_text())
        return [f["source"] for f in manifest["files"]["eval"]]

    assert eval_sources("a") == eval_sources("b")


def test_tar_with_wrapping_folder_and_os_clutter(registry: Registry, tmp_path: Path) -> None:
    path = tmp_path / "t.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, data in {**good_members(), ".DS_Store": b"junk"}.items():
            info = tarfile.TarInfo(f"mytask/{name}" if name != ".DS_Store" else "mytask/.DS_Store")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    task = submit_task(registry, path, name="wrapped", kind="class")
    assert task.classes == ["cat", "dog"]


def test_stream_input_is_accepted(registry: Registry, tmp_path: Path) -> None:
    data = make_zip(tmp_path / "t.zip", good_members()).read_bytes()
    task = submit_task(registry, io.BytesIO(data), name="streamed", kind="class")
    assert task.num_train + task.num_eval == 10


def _symlink_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in good_members().items():
            archive.writestr(name, data)
        link = zipfile.ZipInfo("cat/evil.png")
        link.external_attr = 0o120777 << 16
        archive.writestr(link, "/etc/passwd")
    return path


def _tar_with(path: Path, extra: tarfile.TarInfo, data: bytes | None = None) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, content in good_members().items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
        archive.addfile(extra, io.BytesIO(data) if data is not None else None)
    return path


def _zip_bomb(path: Path) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in good_members().items():
            archive.writestr(name, data)
        archive.writestr("cat/bomb.png", b"\0" * (40 * 2**20))  # 40 MiB of zeros compresses to ~40 KiB
    return path


def _lying_zip(path: Path) -> Path:
    """A member whose header understates its size: reading stops at the stated size, the CRC fails."""
    _zip_bomb(path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("cat/bomb.png")
    # Patch the central-directory uncompressed size to 100 bytes.
    marker = data.rfind(b"PK\x01\x02", 0, len(data))
    while marker != -1:
        name_len = int.from_bytes(data[marker + 28 : marker + 30], "little")
        if data[marker + 46 : marker + 46 + name_len] == b"cat/bomb.png":
            data[marker + 24 : marker + 28] = (100).to_bytes(4, "little")
            break
        marker = data.rfind(b"PK\x01\x02", 0, marker)
    assert info.file_size > 100
    path.write_bytes(bytes(data))
    return path


def _truncated(path: Path) -> Path:
    members = good_members()
    members["cat/broken.jpg"] = jpeg()[:200]
    return make_zip(path, members)


def _tar_symlink(path: Path) -> Path:
    info = tarfile.TarInfo("cat/link.png")
    info.type = tarfile.SYMTYPE
    info.linkname = "../../etc/passwd"
    return _tar_with(path, info)


def _tar_device(path: Path) -> Path:
    info = tarfile.TarInfo("cat/dev")
    info.type = tarfile.CHRTYPE
    return _tar_with(path, info)


def _tar_hardlink(path: Path) -> Path:
    info = tarfile.TarInfo("cat/hard.png")
    info.type = tarfile.LNKTYPE
    info.linkname = "cat/0.png"
    return _tar_with(path, info)


def _empty_class(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in good_members().items():
            archive.writestr(name, data)
        archive.writestr(zipfile.ZipInfo("bird/"), b"")
    return path


def _duplicate_entry(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in good_members().items():
            archive.writestr(name, data)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            archive.writestr("cat/0.png", png(99))
    return path


MALICIOUS = {
    "path traversal": (lambda p: make_zip(p, {**good_members(), "../../evil.png": png()}), UnsafeArchiveError, ".."),
    "absolute path": (
        lambda p: make_zip(p, {**good_members(), "/tmp/evil.png": png()}),
        UnsafeArchiveError,
        "absolute",
    ),
    "windows path": (
        lambda p: make_zip(p, {**good_members(), "cat\\..\\x.png": png()}),
        UnsafeArchiveError,
        "backslash",
    ),
    "zip symlink": (_symlink_zip, UnsafeArchiveError, "symbolic link"),
    "tar symlink": (_tar_symlink, UnsafeArchiveError, "link"),
    "tar hardlink": (_tar_hardlink, UnsafeArchiveError, "link"),
    "tar device": (_tar_device, UnsafeArchiveError, "device"),
    "zip bomb": (_zip_bomb, ArchiveTooLargeError, "bytes"),
    "understated size": (_lying_zip, ArchiveFormatError, "cannot be read"),
    "non-image file": (
        lambda p: make_zip(p, {**good_members(), "cat/notes.txt": b"hello"}),
        InvalidImageError,
        "not an image",
    ),
    "truncated image": (_truncated, InvalidImageError, "truncated"),
    "empty class": (_empty_class, ClassLayoutError, "hold no images"),
    "one-image class": (
        lambda p: make_zip(p, {**good_members(), "bird/0.png": png()}),
        ClassLayoutError,
        "fewer than 2",
    ),
    "duplicate class": (
        lambda p: make_zip(
            p,
            {
                **good_members(),
                **{f"cafe\u0301/{i}.png": png(i) for i in range(3)},
                **{f"caf\u00e9/{i}.png": png(i + 5) for i in range(3)},
            },
        ),
        ClassLayoutError,
        "spelled twice",
    ),
    "duplicate entry": (_duplicate_entry, UnsafeArchiveError, "same path twice"),
    "loose file": (lambda p: make_zip(p, {**good_members(), "readme.png": png()}), ClassLayoutError, "class folder"),
    "bad class name": (
        lambda p: make_zip(p, {**good_members(), **{f"bad\x01name/{i}.png": png(i) for i in range(3)}}),
        ClassLayoutError,
        "not allowed",
    ),
    "not an archive": (
        lambda p: (p.write_bytes(b"this is not an archive" * 10), p)[1],
        ArchiveFormatError,
        "not a zip or tar",
    ),
    "empty upload": (lambda p: (p.write_bytes(b""), p)[1], ArchiveFormatError, "empty"),
    "no files": (lambda p: make_zip(p, {}), ClassLayoutError, "no files"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_archives_are_refused_and_leave_nothing(case: str, registry: Registry, tmp_path: Path) -> None:
    build, error, words = MALICIOUS[case]
    archive = build(tmp_path / "upload.bin")
    limits = IntakeLimits(max_file_bytes=4 * 2**20, max_unpacked_bytes=8 * 2**20)
    with pytest.raises(error) as info:
        submit_task(registry, archive, name="evil", kind="class", limits=limits)
    assert isinstance(info.value, IntakeError)
    assert words in str(info.value)
    assert stored_nothing(registry)


def test_archive_and_file_count_limits(registry: Registry, tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "t.zip", good_members(per_class=5))
    with pytest.raises(ArchiveTooLargeError, match="more than 4 files"):
        submit_task(registry, archive, name="a", kind="class", limits=IntakeLimits(max_files=4))
    with pytest.raises(ArchiveTooLargeError, match="limit"):
        submit_task(registry, archive, name="a", kind="class", limits=IntakeLimits(max_archive_bytes=100))
    with pytest.raises(ArchiveTooLargeError):
        submit_task(
            registry,
            io.BytesIO(archive.read_bytes()),
            name="a",
            kind="class",
            limits=IntakeLimits(max_archive_bytes=100),
        )
    assert stored_nothing(registry)


def test_pixel_limit(registry: Registry, tmp_path: Path) -> None:
    members = {**good_members(), "cat/big.png": png(size=300)}
    with pytest.raises(InvalidImageError, match="over the limit"):
        submit_task(
            registry,
            make_zip(tmp_path / "t.zip", members),
            name="a",
            kind="class",
            limits=IntakeLimits(max_image_pixels=200 * 200),
        )
    assert stored_nothing(registry)


def test_case_distinct_and_symbol_class_names_are_fine(registry: Registry, tmp_path: Path) -> None:
    task = submit_task(
        registry, make_zip(tmp_path / "a.zip", good_members(("A", "a", "$", "café"))), name="glyphs", kind="class"
    )
    assert task.classes == ["A", "a", "$", "café"]


def test_class_task_brings_only_new_classes_domain_task_may_reuse(registry: Registry, tmp_path: Path) -> None:
    submit_task(registry, make_zip(tmp_path / "a.zip", good_members()), name="first", kind="class")
    again = make_zip(tmp_path / "b.zip", good_members(("dog", "fox")))
    with pytest.raises(ClassLayoutError, match=r"dog \(task 'first'\)"):
        submit_task(registry, again, name="second", kind="class")
    task = submit_task(registry, again, name="second", kind="domain")
    assert task.kind == "domain" and task.classes == ["dog", "fox"]


def test_names_are_unique_and_idempotency_key_returns_the_same_task(registry: Registry, tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.zip", good_members())
    first = submit_task(registry, archive, name="pets", kind="class", idempotency_key="k1")
    assert submit_task(registry, archive, name="pets", kind="class", idempotency_key="k1").id == first.id
    assert len(registry.list_tasks()) == 1
    with pytest.raises(TaskConflictError, match="already exists"):
        submit_task(registry, archive, name="pets", kind="class")
    with pytest.raises(TaskConflictError, match="idempotency key"):
        submit_task(registry, archive, name="other", kind="class", idempotency_key="k1")
    with pytest.raises(IntakeError, match="kind"):
        submit_task(registry, archive, name="x", kind="regression")
    with pytest.raises(ClassLayoutError, match="task name"):
        submit_task(registry, archive, name="../x", kind="class")
    assert len(registry.list_tasks()) == 1 and len(stored_objects(registry)) == 1


def test_submit_says_whether_it_stored_or_replayed_even_when_racing(registry: Registry, tmp_path: Path) -> None:
    from fmlora.registry.intake import submit

    archive = make_zip(tmp_path / "a.zip", good_members())
    first = submit(registry, archive, name="pets", kind="class", idempotency_key="k")
    again = submit(registry, archive, name="pets", kind="class", idempotency_key="k")
    assert (first.replayed, again.replayed) == (False, True) and again.task.id == first.task.id

    # A racing twin: its first look finds nothing, so it validates and stores, and its insert collides.
    real_find = registry.find_task
    calls = []

    def blind_at_first(**kw: str) -> object:
        calls.append(kw)
        return None if len(calls) <= 2 else real_find(**kw)  # the key look-up and the name look-up miss

    registry.find_task = blind_at_first  # type: ignore[method-assign]
    registry.known_classes = dict  # type: ignore[method-assign]  # the twin's classes were not yet stored
    raced = submit(registry, archive, name="pets", kind="class", idempotency_key="k")
    assert raced.replayed and raced.task.id == first.task.id
    assert len(calls) == 3  # it got as far as the insert and recovered from the collision
    assert len(registry.list_tasks()) == 1 and len(stored_objects(registry)) == 1
    assert os.listdir(registry.scratch_dir) == []


def test_the_database_decides_a_real_race_for_one_name(registry: Registry, tmp_path: Path) -> None:
    """Threads that all pass the look-up: the unique key lets exactly one store; the rest get a conflict."""
    import threading

    from fmlora.errors import DuplicateKeyError

    archive = make_zip(tmp_path / "a.zip", good_members())
    real_find = registry.find_task
    registry.find_task = lambda **kw: None  # type: ignore[method-assign]  # every racer misses the look-up
    outcomes: list[object] = []
    start = threading.Barrier(4)

    def racer() -> None:
        start.wait()
        try:
            outcomes.append(submit_task(registry, archive, name="pets", kind="class"))
        except TaskConflictError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=racer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    registry.find_task = real_find  # type: ignore[method-assign]
    assert sum(not isinstance(o, Exception) for o in outcomes) == 1
    conflicts = [o for o in outcomes if isinstance(o, TaskConflictError)]
    assert len(conflicts) == 3 and all(isinstance(c.__cause__, DuplicateKeyError) for c in conflicts)
    assert len(registry.list_tasks()) == 1 and len(stored_objects(registry)) == 1

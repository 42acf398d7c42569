"""Benchmark loaders on small fake copies of each dataset layout, built in tmp_path."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmlora.data.datasets import (
    PAPER_BENCHMARKS,
    _stratified_test_counts,
    load_cifar100,
    load_cub200,
    load_domainnet,
    load_imagenet_r,
)
from fmlora.data.images import FileImageSet, ImageSet, TaskData
from fmlora.errors import DataError

SIZE = (8, 8)
DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


def colour(index: int, shade: int = 0) -> tuple[int, int, int]:
    """A distinct solid colour per class (and domain shade), all channels different."""
    return (20 * index + 10, 250 - 20 * index, 40 * shade + 5)


def write_image(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def pixels_of(source: object) -> torch.Tensor:
    """Mean colour of every image of a source, (N, 3); also checks each image is solid."""
    images = source.fetch(torch.arange(len(source))).int()
    assert images.dtype == torch.int32 and images.shape[1] == 3
    flat = images.flatten(2)
    assert (flat.amax(-1) - flat.amin(-1)).max() <= 3, "images should be solid colours"
    return flat.float().mean(-1)


def assert_colours(source: object, expected: dict[str, tuple[int, int, int]]) -> None:
    want = torch.tensor([expected[source.classes[y]] for y in source.labels.tolist()], dtype=torch.float)
    assert torch.allclose(pixels_of(source), want, atol=3), "a label points at another class's image"


def assert_class_incremental(tasks: list[TaskData], num_tasks: int, all_classes: set[str]) -> None:
    assert [t.name for t in tasks] == [f"task{i}" for i in range(num_tasks)]
    assert all(t.kind == "class" for t in tasks)
    per_task = len(all_classes) // num_tasks
    seen: set[str] = set()
    for t in tasks:
        assert len(t.classes) == per_task
        assert t.test.classes == t.train.classes
        assert seen.isdisjoint(t.classes)
        seen.update(t.classes)
        for split in (t.train, t.test):
            assert sorted(set(split.labels.tolist())) == list(range(per_task)), "every class has images"
    assert seen == all_classes


# -- CIFAR-100 -----------------------------------------------------------------------------------

CIFAR_NAMES = ["apple", "bear", "cloud", "dolphin", "forest", "house", "lion", "maple_tree", "rose", "tank"]


def _cifar_split(per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    labels = [k for k in range(len(CIFAR_NAMES)) for _ in range(per_class)]
    rng.shuffle(labels)
    images = np.stack([np.broadcast_to(np.array(colour(k), np.uint8)[:, None, None], (3, 32, 32)) for k in labels])
    return images.reshape(len(labels), 3072).copy(), labels


def make_cifar(root: Path, protocol: int = pickle.HIGHEST_PROTOCOL, legacy: bool = False) -> Path:
    """Fake CIFAR-100 files; ``legacy`` renames numpy globals as numpy 1.x (and the real files) spell them."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("test", 2)):
        data, labels = _cifar_split(per_class, rng)
        record = {b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}
        raw = pickle.dumps(record, protocol=protocol)
        if legacy:
            assert b"numpy._core.multiarray\n_reconstruct" in raw
            raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        (folder / split).write_bytes(raw)
    with (folder / "meta").open("wb") as handle:
        pickle.dump({b"fine_label_names": [n.encode() for n in CIFAR_NAMES]}, handle, protocol=protocol)
    return folder


CIFAR_COLOURS = {name: colour(k) for k, name in enumerate(CIFAR_NAMES)}


@pytest.mark.parametrize(("protocol", "legacy"), [(2, False), (2, True), (pickle.HIGHEST_PROTOCOL, False)])
def test_cifar_natural_order_splits_classes_in_label_order(tmp_path: Path, protocol: int, legacy: bool) -> None:
    make_cifar(tmp_path, protocol, legacy)
    tasks = load_cifar100(tmp_path, num_tasks=5)
    assert_class_incremental(tasks, 5, set(CIFAR_NAMES))
    assert [c for t in tasks for c in t.classes] == CIFAR_NAMES
    for t in tasks:
        assert isinstance(t.train, ImageSet)
        assert t.train.images.shape[1:] == (3, 32, 32) and t.train.images.dtype == torch.uint8
        assert (len(t.train), len(t.test)) == (2 * 3, 2 * 2)
        assert_colours(t.train, CIFAR_COLOURS)
        assert_colours(t.test, CIFAR_COLOURS)


def test_cifar_shuffled_order_follows_randomstate_permutation(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    tasks = load_cifar100(tmp_path, num_tasks=2, order="shuffled", seed=1993)
    expected = [CIFAR_NAMES[i] for i in np.random.RandomState(1993).permutation(10)]
    assert [c for t in tasks for c in t.classes] == expected
    assert expected != CIFAR_NAMES
    assert_class_incremental(tasks, 2, set(CIFAR_NAMES))
    for t in tasks:
        assert_colours(t.train, CIFAR_COLOURS)
    again = load_cifar100(tmp_path, num_tasks=2, order="shuffled", seed=1993)
    assert [t.classes for t in again] == [t.classes for t in tasks]
    assert all(torch.equal(a.train.images, b.train.images) for a, b in zip(again, tasks, strict=True))
    other = load_cifar100(tmp_path, num_tasks=2, order="shuffled", seed=0)
    assert [c for t in other for c in t.classes] != expected


def test_cifar_errors_name_the_missing_file_and_bad_splits(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"expected .*cifar-100-python.train"):
        load_cifar100(tmp_path)
    make_cifar(tmp_path)
    with pytest.raises(DataError, match="10 classes"):
        load_cifar100(tmp_path, num_tasks=3)
    with pytest.raises(DataError, match="order"):
        load_cifar100(tmp_path, order="random")  # type: ignore[arg-type]
    folder = tmp_path / "cifar-100-python"
    data, labels = _cifar_split(2, np.random.default_rng(1))
    with (folder / "test").open("wb") as handle:
        pickle.dump({b"data": data, b"fine_labels": labels[:-1]}, handle)
    with pytest.raises(DataError, match="fine_labels"):
        load_cifar100(tmp_path)
    keep = [i for i, y in enumerate(labels) if y != 4]
    with (folder / "test").open("wb") as handle:
        pickle.dump({b"data": data[keep], b"fine_labels": [labels[i] for i in keep]}, handle)
    with pytest.raises(DataError, match="no test images: forest"):
        load_cifar100(tmp_path)


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class _RunsPython:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_RunsCommand, _RunsPython])
def test_cifar_pickle_with_foreign_global_is_refused_without_running_it(tmp_path: Path, payload: type) -> None:
    folder = make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    data, labels = _cifar_split(3, np.random.default_rng(0))
    with (folder / "train").open("wb") as handle:
        pickle.dump({b"data": data, b"fine_labels": labels, b"x": payload(marker)}, handle)
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_cifar100(tmp_path)
    assert not marker.exists()


# -- ImageNet-R ----------------------------------------------------------------------------------

IMR_SIZES = {"n01443537": 5, "n01484850": 6, "n01494475": 7, "n01498041": 12}  # 30 images -> 24/6
IMR_COLOURS = {wnid: colour(k) for k, wnid in enumerate(IMR_SIZES)}


def make_imagenet_r(root: Path) -> dict[str, list[str]]:
    files = {}
    for wnid, count in IMR_SIZES.items():
        names = [f"art_{i}.png" if i % 2 else f"photo_{i}.jpg" for i in range(count)]
        for name in names:
            write_image(root / "imagenet-r" / wnid / name, IMR_COLOURS[wnid])
        files[wnid] = names
    (root / "imagenet-r" / IMR_SIZES.__iter__().__next__() / "notes.txt").write_text("not an image")
    return files


def _relative(source: FileImageSet, base: Path) -> list[str]:
    return [str(p.relative_to(base)) for p in source.paths]


def test_imagenet_r_generated_split_is_stratified_80_20_and_seeded(tmp_path: Path) -> None:
    make_imagenet_r(tmp_path)
    tasks = load_imagenet_r(tmp_path, num_tasks=2, image_size=SIZE, seed=0)
    assert_class_incremental(tasks, 2, set(IMR_SIZES))
    assert [c for t in tasks for c in t.classes] == sorted(IMR_SIZES)
    base = tmp_path / "imagenet-r"
    train = [p for t in tasks for p in _relative(t.train, base)]
    test = [p for t in tasks for p in _relative(t.test, base)]
    assert (len(train), len(test)) == (24, 6)
    assert set(train).isdisjoint(test) and not any(p.endswith(".txt") for p in train + test)
    for t in tasks:
        assert isinstance(t.train, FileImageSet) and t.train.image_size == SIZE
        assert_colours(t.train, IMR_COLOURS)
        assert_colours(t.test, IMR_COLOURS)
    same = load_imagenet_r(tmp_path, num_tasks=2, image_size=SIZE, seed=0)
    assert [p for t in same for p in _relative(t.test, base)] == test
    other = load_imagenet_r(tmp_path, num_tasks=2, image_size=SIZE, seed=1)
    assert [p for t in other for p in _relative(t.test, base)] != test


def test_stratified_counts_reproduce_the_coda_prompt_sizes() -> None:
    shift = np.random.default_rng(0).integers(-100, 101, size=100)
    sizes = np.concatenate([150 + shift, 150 - shift])  # 200 classes of 50..250 images, 30,000 in all
    counts = _stratified_test_counts(sizes, 0.2)
    assert sizes.sum() == 30_000 and counts.sum() == 6_000
    assert np.all(np.abs(counts - sizes * 0.2) < 1)


def test_imagenet_r_split_files_define_the_lists_and_the_class_order(tmp_path: Path) -> None:
    files = make_imagenet_r(tmp_path)
    label_of = {"n01498041": 0, "n01443537": 1, "n01494475": 2, "n01484850": 3}
    train_lines, test_lines = [], []
    for wnid, names in files.items():
        for i, name in enumerate(names):
            prefix = "imagenet-r/" if i % 3 == 0 else ""  # both spellings of the path are accepted
            (test_lines if i < 2 else train_lines).append(f"{prefix}{wnid}/{name} {label_of[wnid]}")
    (tmp_path / "train.txt").write_text("\n".join(train_lines) + "\n\n")
    (tmp_path / "test.txt").write_text("\n".join(test_lines))
    split = (tmp_path / "train.txt", tmp_path / "test.txt")
    tasks = load_imagenet_r(tmp_path, num_tasks=4, image_size=SIZE, split_files=split)
    assert [t.classes for t in tasks] == [(w,) for w in sorted(label_of, key=label_of.get)]
    base = tmp_path / "imagenet-r"
    test = {p for t in tasks for p in _relative(t.test, base)}
    assert test == {f"{w}/{n}" for w, names in files.items() for n in names[:2]}
    assert sum(len(t.train) for t in tasks) == 30 - 8
    for t in tasks:
        assert_colours(t.train, IMR_COLOURS)
        assert_colours(t.test, IMR_COLOURS)
    # The same files at the conventional place are picked up without being named.
    (tmp_path / "train.txt").rename(tmp_path / "imagenet-r_train.txt")
    (tmp_path / "test.txt").rename(tmp_path / "imagenet-r_test.txt")
    auto = load_imagenet_r(tmp_path, num_tasks=4, image_size=SIZE)
    assert {p for t in auto for p in _relative(t.test, base)} == test


def test_imagenet_r_split_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="ImageNet-R not found"):
        load_imagenet_r(tmp_path)
    make_imagenet_r(tmp_path)
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    test.write_text("n01443537/photo_0.jpg 0\nn01484850/photo_0.jpg 1\n")
    cases = {
        "n01443537/art_1.png 0\nn01484850/art_1.png 0\n": "label 0 is used for both",
        "n01443537/art_1.png 0\nn01484850/missing.jpg 1\n": "do not exist",
        "n01443537/photo_0.jpg 0\nn01484850/art_1.png 1\n": "in both split files",
        "n01443537/art_1.png zero\n": "expected 'relative/path label'",
        "../outside.png 0\n": "must be relative",
        "n01443537/art_1.png 0\nn01494475/art_1.png 5\n": "without gaps",
    }
    for text, message in cases.items():
        train.write_text(text)
        with pytest.raises(DataError, match=message):
            load_imagenet_r(tmp_path, num_tasks=1, split_files=(train, test))
    (tmp_path / "imagenet-r_train.txt").write_text("n01443537/art_1.png 0\n")
    with pytest.raises(DataError, match="only one of"):
        load_imagenet_r(tmp_path, num_tasks=1)


# -- CUB-200 -------------------------------------------------------------------------------------

CUB_FOLDERS = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "010.Red_winged_Blackbird", "100.Brown_Pelican"]
CUB_COLOURS = {f.split(".", 1)[1]: colour(k) for k, f in enumerate(CUB_FOLDERS)}


def make_cub(root: Path) -> None:
    for k, folder in enumerate(reversed(CUB_FOLDERS)):  # creation order must not matter
        rgb = CUB_COLOURS[folder.split(".", 1)[1]]
        for i in range(3):
            write_image(root / "cub" / "train" / folder / f"{folder}_{i}.jpg", rgb)
        write_image(root / "cub" / "test" / folder / f"{folder}_t{k}.jpg", rgb)


def test_cub_sorted_folders_stripped_names_equal_tasks(tmp_path: Path) -> None:
    make_cub(tmp_path)
    tasks = load_cub200(tmp_path, num_tasks=2, image_size=SIZE)
    assert [t.classes for t in tasks] == [
        ("Black_footed_Albatross", "Laysan_Albatross"),
        ("Red_winged_Blackbird", "Brown_Pelican"),
    ]
    assert_class_incremental(tasks, 2, set(CUB_COLOURS))
    for t in tasks:
        assert (len(t.train), len(t.test)) == (6, 2)
        assert_colours(t.train, CUB_COLOURS)
        assert_colours(t.test, CUB_COLOURS)
    registry = PAPER_BENCHMARKS["cub200"](tmp_path, 4, SIZE, 0)
    assert [t.classes for t in registry] == [(c,) for c in CUB_COLOURS]


def test_cub_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"expected .*cub.train"):
        load_cub200(tmp_path)
    make_cub(tmp_path)
    with pytest.raises(DataError, match="4 classes"):
        load_cub200(tmp_path, num_tasks=3)
    (tmp_path / "cub" / "test" / "200.Common_Yellowthroat").mkdir()
    with pytest.raises(DataError, match="folders differ"):
        load_cub200(tmp_path, num_tasks=1)
    (tmp_path / "cub" / "train" / "200.Common_Yellowthroat").mkdir()
    with pytest.raises(DataError, match=r"no train images: 200\.Common_Yellowthroat"):
        load_cub200(tmp_path, num_tasks=1)


# -- DomainNet -----------------------------------------------------------------------------------

DN_CLASSES = ["aircraft_carrier", "airplane", "alarm_clock", "ambulance"]


def dn_colours(domain: str) -> dict[str, tuple[int, int, int]]:
    return {c: colour(k, DOMAINS.index(domain)) for k, c in enumerate(DN_CLASSES)}


def make_domainnet(root: Path, domains: tuple[str, ...] = DOMAINS) -> None:
    folder = root / "domainnet"
    for domain in domains:
        for split, count in (("train", 2), ("test", 1)):
            lines = []
            for label, name in enumerate(DN_CLASSES):
                for i in range(count):
                    rel = f"{domain}/{name}/{domain}_{split}_{label:03d}_{i}.png"
                    write_image(folder / rel, dn_colours(domain)[name])
                    lines.append(f"{rel} {label}")
            (folder / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")


def test_domainnet_class_mode_pools_domains_into_disjoint_class_tasks(tmp_path: Path) -> None:
    domains = ("clipart", "real", "sketch")
    make_domainnet(tmp_path, domains)
    tasks = load_domainnet(tmp_path, "class", num_tasks=2, image_size=SIZE, domains=domains)
    assert_class_incremental(tasks, 2, set(DN_CLASSES))
    assert [t.classes for t in tasks] == [tuple(DN_CLASSES[:2]), tuple(DN_CLASSES[2:])]
    for t in tasks:
        assert (len(t.train), len(t.test)) == (3 * 2 * 2, 3 * 2)
        found = {p.parts[-3] for p in t.train.paths}
        assert found == set(domains)
        for source in (t.train, t.test):
            for domain in domains:
                keep = torch.tensor([p.parts[-3] == domain for p in source.paths]).nonzero().flatten()
                part = FileImageSet(
                    tuple(source.paths[i] for i in keep.tolist()), source.labels[keep], source.classes, SIZE
                )
                assert_colours(part, dn_colours(domain))


def test_domainnet_domain_mode_is_one_task_per_domain_over_all_classes(tmp_path: Path) -> None:
    make_domainnet(tmp_path)
    tasks = load_domainnet(tmp_path, "domain", num_tasks=None, image_size=SIZE)
    assert [t.name for t in tasks] == list(DOMAINS)
    assert all(t.kind == "domain" and t.classes == tuple(DN_CLASSES) for t in tasks)
    for t in tasks:
        assert {p.parts[-3] for p in t.train.paths} == {t.name}
        assert (len(t.train), len(t.test)) == (8, 4)
        assert_colours(t.train, dn_colours(t.name))
        assert_colours(t.test, dn_colours(t.name))
    registry = PAPER_BENCHMARKS["domainnet-dil"](tmp_path, 6, SIZE, 0)
    assert [t.name for t in registry] == list(DOMAINS)
    with pytest.raises(DataError, match="one task per domain"):
        PAPER_BENCHMARKS["domainnet-dil"](tmp_path, 5, SIZE, 0)
    cil = PAPER_BENCHMARKS["domainnet"](tmp_path, 2, SIZE, 0)
    assert [t.kind for t in cil] == ["class", "class"] and len(cil[0].train) == 6 * 2 * 2


def test_domainnet_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"expected split file .*clipart_train.txt"):
        load_domainnet(tmp_path)
    make_domainnet(tmp_path, ("clipart", "real"))
    with pytest.raises(DataError, match="4 classes"):
        load_domainnet(tmp_path, num_tasks=3, domains=("clipart", "real"))
    real = tmp_path / "domainnet" / "real_test.txt"
    lines = real.read_text().splitlines()
    real.write_text("\n".join([*lines[:-1], lines[-1].replace(" 3", " 2")]))
    with pytest.raises(DataError, match="used for both 'alarm_clock' and 'ambulance'"):
        load_domainnet(tmp_path, num_tasks=2, domains=("clipart", "real"))
    real.write_text("\n".join([*lines, "real/ambulance/gone.png 3"]))
    with pytest.raises(DataError, match=r"1 images listed in .*real_test\.txt do not exist"):
        load_domainnet(tmp_path, num_tasks=2, domains=("clipart", "real"))
    real.write_text("\n".join([*lines, "clipart/ambulance/clipart_test_003_0.png 3"]))
    with pytest.raises(DataError, match="expected paths like real/<class>/<image>"):
        load_domainnet(tmp_path, num_tasks=2, domains=("clipart", "real"))


def test_registry_names_and_cifar_entries(tmp_path: Path) -> None:
    assert {"cifar100", "imagenet-r", "cub200", "domainnet", "domainnet-dil"} <= set(PAPER_BENCHMARKS)
    make_cifar(tmp_path)
    natural = PAPER_BENCHMARKS["cifar100"](tmp_path, 10, (224, 224), 3)
    assert [t.classes for t in natural] == [(n,) for n in CIFAR_NAMES]
    shuffled = PAPER_BENCHMARKS["cifar100-shuffled"](tmp_path, 10, (224, 224), 3)
    assert [t.classes[0] for t in shuffled] == [CIFAR_NAMES[i] for i in np.random.RandomState(3).permutation(10)]

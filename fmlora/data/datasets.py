"""Task streams for the paper's continual-learning benchmarks, built from dataset folders on disk.

Nothing is downloaded: each loader reads the layout the benchmark's usual code base expects and
checks it (missing files, empty classes, inconsistent labels) before returning, raising
``DataError`` with the path it looked at. Every loader returns ``list[TaskData]`` named ``task0``,
``task1``, ... (domain-incremental DomainNet: the domain names), and the same inputs always give the
same stream.

Protocol (InfLoRA code base, see REFERENCES §2):

- CIFAR-100: 10 tasks x 10 classes, natural class order (``order="natural"``, InfLoRA). The
  PyCIL/SD-LoRA convention shuffles the classes with ``numpy.random.RandomState(seed).permutation``,
  which equals ``np.random.seed(seed); np.random.permutation(n)``; PyCIL's seed is 1993.
- ImageNet-R: 200 classes; CODA-Prompt's fixed 24,000/6,000 train/test lists when given as
  ``split_files``, otherwise a seeded stratified 80/20 split with the same sizes (not the same lists).
- CUB-200: 200 classes in equal tasks, on LAMDA-PILOT's ``cub/train`` and ``cub/test`` folders.
- DomainNet: the InfLoRA split is class-incremental (345 classes pooled over all domains, 5 tasks x
  69 classes); ``mode="domain"`` gives the true domain-incremental stream, one domain per task.

Class order inside the class-incremental loaders is the label order (CIFAR fine label index, sorted
folder names, the split files' labels), so task ``t`` holds classes ``t*k .. (t+1)*k - 1``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fmlora.errors import DataError

from .images import FileImageSet, ImageSet, TaskData
from .pickled import field_of, load_pickle

__all__ = [
    "PAPER_BENCHMARKS",
    "load_cifar100",
    "load_cub200",
    "load_domainnet",
    "load_imagenet_r",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


# -- restricted unpickling -----------------------------------------------------------------------


def _group_order(num_classes: int, num_tasks: int, what: str) -> None:
    if num_tasks < 1 or num_classes % num_tasks:
        raise DataError(f"{what} has {num_classes} classes, which cannot be split into {num_tasks} equal tasks")


def _class_tasks(
    num_tasks: int,
    order: Sequence[int],
    classes: Sequence[str],
    make: Callable[[str, np.ndarray, np.ndarray, tuple[str, ...]], Any],
    labels: dict[str, np.ndarray],
) -> list[TaskData]:
    """Class-incremental tasks: ``order`` (global class ids) cut into ``num_tasks`` equal groups.

    ``make(split, sample_index, local_labels, class_names)`` builds one split's image source.
    """
    per_task = len(order) // num_tasks
    tasks = []
    for t in range(num_tasks):
        group = np.asarray(order[t * per_task : (t + 1) * per_task], dtype=np.int64)
        local = np.full(len(classes), -1, dtype=np.int64)
        local[group] = np.arange(len(group))
        names = tuple(classes[c] for c in group)
        splits = {}
        for split in ("train", "test"):
            index = np.flatnonzero(local[labels[split]] >= 0)
            splits[split] = make(split, index, local[labels[split][index]], names)
        tasks.append(TaskData(name=f"task{t}", kind="class", train=splits["train"], test=splits["test"]))
    return tasks


def _check_every_class(classes: Sequence[str], labels: dict[str, np.ndarray], where: object) -> None:
    for split, split_labels in labels.items():
        counts = np.bincount(split_labels, minlength=len(classes))
        empty = [classes[c] for c in np.flatnonzero(counts == 0)]
        if empty:
            shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
            raise DataError(f"{where}: {len(empty)} classes have no {split} images: {shown}")


def _file_maker(
    split_paths: dict[str, list[Path]], image_size: tuple[int, int]
) -> Callable[[str, np.ndarray, np.ndarray, tuple[str, ...]], FileImageSet]:
    """A ``make`` for ``_class_tasks`` over files on disk."""
    size = (int(image_size[0]), int(image_size[1]))

    def make(split: str, index: np.ndarray, local: np.ndarray, names: tuple[str, ...]) -> FileImageSet:
        paths = split_paths[split]
        return FileImageSet(tuple(paths[i] for i in index.tolist()), torch.from_numpy(local), names, image_size=size)

    return make


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_files_exist(paths: Iterable[Path], listed_in: object) -> None:
    """Every path exists; one directory listing per folder instead of one stat per file."""
    listings: dict[Path, set[str] | None] = {}
    missing = []
    for path in paths:
        parent = path.parent
        if parent not in listings:
            try:
                listings[parent] = set(os.listdir(parent))
            except OSError:
                listings[parent] = None
        names = listings[parent]
        if names is None or path.name not in names:
            missing.append(path)
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise DataError(f"{len(missing)} images listed in {listed_in} do not exist: {shown}")


def _read_split_file(path: Path, image_root: Path, strip_prefix: str | None = None) -> tuple[list[Path], list[int]]:
    """Lines ``relative/path label``; paths relative to ``image_root`` (a leading ``strip_prefix``
    folder is dropped, so lists written relative to the dataset's parent work too)."""
    if not path.is_file():
        raise DataError(f"split file {path} does not exist")
    paths, labels = [], []
    with path.open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not re.fullmatch(r"\d+", parts[1]):
                raise DataError(f"{path}:{number}: expected 'relative/path label', got {line!r}")
            rel = Path(parts[0])
            if rel.is_absolute() or ".." in rel.parts:
                raise DataError(f"{path}:{number}: image paths must be relative and stay inside {image_root}")
            if strip_prefix is not None and len(rel.parts) > 1 and rel.parts[0] == strip_prefix:
                rel = Path(*rel.parts[1:])
            paths.append(image_root / rel)
            labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"split file {path} lists no images")
    return paths, labels


def _label_names(
    entries: Iterable[tuple[int, str, object]],
) -> tuple[str, ...]:
    """Class names indexed by label from (label, class name, where) triples; labels must be 0..C-1 and
    map one-to-one onto names."""
    name_of: dict[int, str] = {}
    label_of: dict[str, int] = {}
    for label, name, where in entries:
        if name_of.setdefault(label, name) != name:
            raise DataError(f"{where}: label {label} is used for both {name_of[label]!r} and {name!r}")
        if label_of.setdefault(name, label) != label:
            raise DataError(f"{where}: class {name!r} has both label {label_of[name]} and {label}")
    if sorted(name_of) != list(range(len(name_of))):
        missing = sorted(set(range(max(name_of) + 1)) - set(name_of))[:5]
        raise DataError(f"labels must be 0..{len(name_of) - 1} without gaps; missing e.g. {missing}")
    return tuple(name_of[i] for i in range(len(name_of)))


# -- CIFAR-100 -----------------------------------------------------------------------------------


def load_cifar100(
    root: str | Path,
    num_tasks: int = 10,
    order: Literal["natural", "shuffled"] = "natural",
    seed: int = 0,
) -> list[TaskData]:
    """CIFAR-100 (python pickle version) as ``num_tasks`` class-incremental tasks of 32x32 images.

    Reads ``root/cifar-100-python/{train,test,meta}``. ``order="natural"`` keeps the fine-label order
    (InfLoRA; ``seed`` unused); ``"shuffled"`` permutes it with ``numpy.random.RandomState(seed)``,
    the PyCIL convention (PyCIL uses ``seed=1993``). The pickles are read by an unpickler that only
    rebuilds numpy arrays, so a tampered file cannot run code.
    """
    folder = Path(root) / "cifar-100-python"
    for name in ("train", "test", "meta"):
        if not (folder / name).is_file():
            raise DataError(
                f"CIFAR-100 not found under {root}: expected {folder / name} "
                "(extract cifar-100-python.tar.gz into that folder)"
            )
    names_raw = field_of(load_pickle(folder / "meta"), "fine_label_names", folder / "meta")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names_raw)
    if not classes or len(set(classes)) != len(classes):
        raise DataError(f"{folder / 'meta'}: fine_label_names must be a non-empty list of distinct names")
    images: dict[str, torch.Tensor] = {}
    labels: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        path = folder / split
        record = load_pickle(path)
        data = field_of(record, "data", path)
        raw_labels = field_of(record, "fine_labels", path)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            shape = getattr(data, "shape", None)
            raise DataError(
                f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {type(data).__name__} {shape}"
            )
        try:
            split_labels = np.asarray(raw_labels, dtype=np.int64)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: 'fine_labels' must be integers") from exc
        if split_labels.shape != (data.shape[0],):
            raise DataError(f"{path}: {data.shape[0]} images but {split_labels.size} fine_labels")
        if split_labels.size == 0 or split_labels.min() < 0 or split_labels.max() >= len(classes):
            raise DataError(f"{path}: fine_labels must lie in 0..{len(classes) - 1} (the meta file's class count)")
        images[split] = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
        labels[split] = split_labels
    _check_every_class(classes, labels, folder)
    _group_order(len(classes), num_tasks, "CIFAR-100")
    if order == "natural":
        class_order = np.arange(len(classes))
    elif order == "shuffled":
        class_order = np.random.RandomState(seed).permutation(len(classes))
    else:
        raise DataError(f"order must be 'natural' or 'shuffled', got {order!r}")

    def make(split: str, index: np.ndarray, local: np.ndarray, names: tuple[str, ...]) -> ImageSet:
        picked = torch.from_numpy(index)
        return ImageSet(images[split][picked].contiguous(), torch.from_numpy(local), names)

    return _class_tasks(num_tasks, class_order, classes, make, labels)


# -- ImageNet-R ----------------------------------------------------------------------------------


def _stratified_test_counts(sizes: np.ndarray, test_fraction: float) -> np.ndarray:
    """Per-class test counts summing to round(total * fraction) (largest remainders, ties to the lower
    class index), each kept in 1..size-1."""
    exact = sizes * test_fraction
    counts = np.floor(exact).astype(np.int64)
    target = int(np.floor(sizes.sum() * test_fraction + 0.5))
    extra = target - int(counts.sum())
    if extra > 0:
        by_remainder = np.lexsort((np.arange(len(sizes)), -(exact - counts)))
        counts[by_remainder[:extra]] += 1
    return np.clip(counts, 1, sizes - 1)


def load_imagenet_r(
    root: str | Path,
    num_tasks: int = 10,
    image_size: tuple[int, int] = (224, 224),
    seed: int = 0,
    split_files: tuple[str | Path, str | Path] | None = None,
) -> list[TaskData]:
    """ImageNet-R (``root/imagenet-r/<wnid>/<image>``, 200 classes) as class-incremental tasks.

    ``split_files=(train_txt, test_txt)``: lines ``relative/path label`` (paths relative to
    ``root/imagenet-r``; a leading ``imagenet-r/`` is accepted), e.g. CODA-Prompt's fixed
    24,000/6,000 lists converted to text. Without them, ``root/imagenet-r_train.txt`` and
    ``root/imagenet-r_test.txt`` are used when both exist; otherwise each class's sorted images are
    split 80/20 with ``numpy.random.default_rng(seed)``, stratified so that the totals are exactly
    round(20%) of all images -- on the full 30,000-image set 24,000 train / 6,000 test, the sizes of
    the CODA-Prompt split but not its lists (numbers are then not strictly comparable with papers).
    Class names are the wnid folder names; classes are ordered by label (sorted wnids).
    """
    base = Path(root)
    folder = base / "imagenet-r"
    if not folder.is_dir():
        raise DataError(f"ImageNet-R not found under {root}: expected {folder}/<wnid>/<image>.jpg")
    if split_files is None:
        found = [base / "imagenet-r_train.txt", base / "imagenet-r_test.txt"]
        present = [p.is_file() for p in found]
        if all(present):
            split_files = (found[0], found[1])
        elif any(present):
            raise DataError(f"found only one of {found[0]} and {found[1]}; provide both or neither")

    split_paths: dict[str, list[Path]] = {}
    labels: dict[str, np.ndarray] = {}
    if split_files is not None:
        if len(split_files) != 2:
            raise DataError(f"split_files must be (train_txt, test_txt), got {split_files!r}")
        raw: dict[str, tuple[list[Path], list[int]]] = {}
        for split, file in zip(("train", "test"), split_files, strict=True):
            raw[split] = _read_split_file(Path(file), folder, strip_prefix="imagenet-r")
            _check_files_exist(raw[split][0], file)
        overlap = set(raw["train"][0]) & set(raw["test"][0])
        if overlap:
            raise DataError(f"{len(overlap)} images are in both split files, e.g. {sorted(overlap)[0]}")
        classes = _label_names(
            (label, path.parent.name, file)
            for (paths, split_labels), file in zip(raw.values(), split_files, strict=True)
            for path, label in zip(paths, split_labels, strict=True)
        )
        for split in ("train", "test"):
            split_paths[split] = raw[split][0]
            labels[split] = np.asarray(raw[split][1], dtype=np.int64)
        where: object = f"split files {split_files[0]}, {split_files[1]}"
    else:
        class_dirs = _subfolders(folder)
        if not class_dirs:
            raise DataError(f"ImageNet-R folder {folder} has no class folders (expected {folder}/<wnid>/...)")
        classes = tuple(d.name for d in class_dirs)
        files = [_images_in(d) for d in class_dirs]
        sizes = np.array([len(f) for f in files], dtype=np.int64)
        small = [classes[i] for i in np.flatnonzero(sizes < 2)]
        if small:
            raise DataError(f"{folder}: classes need at least 2 images for a train/test split: {small[:5]}")
        test_counts = _stratified_test_counts(sizes, 0.2)
        rng = np.random.default_rng(seed)
        split_paths = {"train": [], "test": []}
        by_split: dict[str, list[int]] = {"train": [], "test": []}
        for label, (paths, n_test) in enumerate(zip(files, test_counts.tolist(), strict=True)):
            is_test = np.zeros(len(paths), dtype=bool)
            is_test[rng.permutation(len(paths))[:n_test]] = True
            for path, test in zip(paths, is_test.tolist(), strict=True):
                split = "test" if test else "train"
                split_paths[split].append(path)
                by_split[split].append(label)
        labels = {split: np.asarray(v, dtype=np.int64) for split, v in by_split.items()}
        where = folder
    _check_every_class(classes, labels, where)
    _group_order(len(classes), num_tasks, "ImageNet-R")
    return _class_tasks(num_tasks, np.arange(len(classes)), classes, _file_maker(split_paths, image_size), labels)


# -- CUB-200 -------------------------------------------------------------------------------------


def load_cub200(
    root: str | Path,
    num_tasks: int = 10,
    image_size: tuple[int, int] = (224, 224),
) -> list[TaskData]:
    """CUB-200-2011 in LAMDA-PILOT's layout, ``root/cub/{train,test}/<NNN.Class_Name>/*.jpg``.

    Class folders are sorted (so ``001.Black_footed_Albatross`` comes first) and cut into
    ``num_tasks`` equal tasks; class names drop the numeric prefix (``Black_footed_Albatross``).
    """
    folder = Path(root) / "cub"
    split_dirs = {split: folder / split for split in ("train", "test")}
    for split, path in split_dirs.items():
        if not path.is_dir():
            raise DataError(f"CUB-200 not found under {root}: expected {path}/<NNN.Class_Name>/*.jpg ({split} split)")
    folders = {split: [d.name for d in _subfolders(path)] for split, path in split_dirs.items()}
    if not folders["train"]:
        raise DataError(f"{split_dirs['train']} has no class folders")
    if folders["train"] != folders["test"]:
        differ = sorted(set(folders["train"]) ^ set(folders["test"]))
        raise DataError(f"CUB-200 train and test class folders differ: {differ[:5]}")
    classes = tuple(re.sub(r"^\d+\.", "", name) for name in folders["train"])
    if len(set(classes)) != len(classes):
        raise DataError(f"{folder}: class names repeat once the numeric prefixes are dropped")
    split_paths: dict[str, list[Path]] = {}
    labels: dict[str, np.ndarray] = {}
    for split, path in split_dirs.items():
        paths, split_labels = [], []
        for label, name in enumerate(folders[split]):
            images = _images_in(path / name)
            paths.extend(images)
            split_labels.extend([label] * len(images))
        split_paths[split] = paths
        labels[split] = np.asarray(split_labels, dtype=np.int64)
    _check_every_class(folders["train"], labels, folder)
    _group_order(len(classes), num_tasks, "CUB-200")
    return _class_tasks(num_tasks, np.arange(len(classes)), classes, _file_maker(split_paths, image_size), labels)


# -- DomainNet -----------------------------------------------------------------------------------


def load_domainnet(
    root: str | Path,
    mode: Literal["class", "domain"] = "class",
    num_tasks: int | None = 5,
    image_size: tuple[int, int] = (224, 224),
    domains: Sequence[str] = DOMAINNET_DOMAINS,
) -> list[TaskData]:
    """DomainNet from its split files ``root/domainnet/<domain>_{train,test}.txt`` (lines
    ``clipart/aircraft_carrier/clipart_001_000001.jpg 0``, images under ``root/domainnet/``).

    ``mode="class"``: InfLoRA's class-incremental split -- all given domains pooled, the classes (345,
    by label) cut into ``num_tasks`` equal tasks (5 x 69), kind ``"class"``.
    ``mode="domain"``: domain-incremental -- one task per domain in the given order, named after it,
    each over all classes, kind ``"domain"``; ``num_tasks`` must be ``None`` or ``len(domains)``.
    Class names are the class folder names; labels must agree with them across all files.
    """
    folder = Path(root) / "domainnet"
    domains = tuple(domains)
    if not domains or len(set(domains)) != len(domains):
        raise DataError(f"domains must be a non-empty list of distinct names, got {domains}")
    if mode not in ("class", "domain"):
        raise DataError(f"mode must be 'class' or 'domain', got {mode!r}")
    if mode == "domain" and num_tasks not in (None, len(domains)):
        raise DataError(
            f"domain-incremental DomainNet has one task per domain ({len(domains)}); got num_tasks={num_tasks}"
        )
    raw: dict[tuple[str, str], tuple[list[Path], list[int]]] = {}
    for domain in domains:
        for split in ("train", "test"):
            file = folder / f"{domain}_{split}.txt"
            if not file.is_file():
                raise DataError(
                    f"DomainNet not found under {root}: expected split file {file} "
                    f"(and images under {folder}/{domain}/<class>/)"
                )
            paths, split_labels = _read_split_file(file, folder)
            for path in paths:
                rel = path.relative_to(folder).parts
                if len(rel) != 3 or rel[0] != domain:
                    raise DataError(f"{file}: expected paths like {domain}/<class>/<image>, got {path}")
            _check_files_exist(paths, file)
            raw[(domain, split)] = (paths, split_labels)
    classes = _label_names(
        (label, path.parent.name, folder / f"{domain}_{split}.txt")
        for (domain, split), (paths, split_labels) in raw.items()
        for path, label in zip(paths, split_labels, strict=True)
    )
    size = (int(image_size[0]), int(image_size[1]))
    if mode == "domain":
        tasks = []
        for domain in domains:
            splits = {}
            for split in ("train", "test"):
                paths, split_labels = raw[(domain, split)]
                splits[split] = FileImageSet(
                    tuple(paths), torch.tensor(split_labels, dtype=torch.long), classes, image_size=size
                )
            tasks.append(TaskData(name=domain, kind="domain", train=splits["train"], test=splits["test"]))
        return tasks
    split_paths = {s: [p for d in domains for p in raw[(d, s)][0]] for s in ("train", "test")}
    labels = {s: np.asarray([y for d in domains for y in raw[(d, s)][1]], dtype=np.int64) for s in ("train", "test")}
    _check_every_class(classes, labels, folder)
    count = 5 if num_tasks is None else num_tasks
    _group_order(len(classes), count, "DomainNet")
    return _class_tasks(count, np.arange(len(classes)), classes, _file_maker(split_paths, size), labels)


# -- registry ------------------------------------------------------------------------------------

BenchmarkLoader = Callable[[Path, int, tuple[int, int], int], list[TaskData]]


def _cifar100(root: Path, num_tasks: int, image_size: tuple[int, int], seed: int) -> list[TaskData]:
    return load_cifar100(root, num_tasks, order="natural")


def _cifar100_shuffled(root: Path, num_tasks: int, image_size: tuple[int, int], seed: int) -> list[TaskData]:
    return load_cifar100(root, num_tasks, order="shuffled", seed=seed)


def _imagenet_r(root: Path, num_tasks: int, image_size: tuple[int, int], seed: int) -> list[TaskData]:
    return load_imagenet_r(root, num_tasks, image_size, seed=0)


def _cub200(root: Path, num_tasks: int, image_size: tuple[int, int], seed: int) -> list[TaskData]:
    return load_cub200(root, num_tasks, image_size)


def _domainnet(root: Path, num_tasks: int, image_size: tuple[int, int], seed: int) -> list[TaskData]:
    return load_domainnet(root, "class", num_tasks, image_size)


def _domainnet_dil(root: Path, num_tasks: int, image_size: tuple[int, int], seed: int) -> list[TaskData]:
    return load_domainnet(root, "domain", num_tasks, image_size)


PAPER_BENCHMARKS: dict[str, BenchmarkLoader] = {
    "cifar100": _cifar100,
    "cifar100-shuffled": _cifar100_shuffled,
    "imagenet-r": _imagenet_r,
    "cub200": _cub200,
    "domainnet": _domainnet,
    "domainnet-dil": _domainnet_dil,
}
"""Benchmark name -> ``loader(root, num_tasks, image_size, seed)``.

``seed`` is the run's seed. The published protocols keep the data identical across seeds (natural
class order, fixed splits), so only ``cifar100-shuffled`` uses it (as the class-order seed, PyCIL's
convention); ``imagenet-r`` always uses split seed 0 unless split files are present. CIFAR-100
images stay 32x32 (the model's preprocessor resizes them), so ``image_size`` does not apply to it.
``domainnet-dil`` needs ``num_tasks`` equal to the number of domains (6).
"""

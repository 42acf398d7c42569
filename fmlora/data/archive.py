"""Write image sets as task archives (one folder per class, PNG images), the format POST /tasks takes.

Used by the demo and the benchmarks to submit the offline benchmark through the real API, and by
anyone who holds a task in memory rather than in folders.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from .images import ImageSource, batches

__all__ = ["write_task_archive"]


def _png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def write_task_archive(
    source: ImageSource, path: str | Path, fmt: Literal["zip", "tar"] = "zip", batch_size: int = 256
) -> Path:
    """Write ``source``'s images as ``<class>/<n>.png`` into a zip or tar at ``path`` (atomically)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    counters = dict.fromkeys(source.classes, 0)
    members: list[tuple[str, bytes]] = []
    for images, labels in batches(source, batch_size):
        for image, label in zip(images, labels.tolist(), strict=True):
            cls = source.classes[label]
            members.append((f"{cls}/{counters[cls]:05d}.png", _png(image)))
            counters[cls] += 1
    if fmt == "zip":
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in members:
                archive.writestr(name, data)
    else:
        with tarfile.open(tmp, "w") as archive:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return path

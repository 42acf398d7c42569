"""ONNX Runtime backend for CPU serving (``EngineConfig(backend="onnx")``).

The model's architecture and frozen weights are exported once (``fmlora.export.onnx.export_onnx``) with
every adapter tensor as a graph input, and cached on disk by a fingerprint of the backbone weights,
the model configuration and the exporter versions. A version becomes a feed dictionary when it is
prepared (in the loading thread, with a probe run: ONNX Runtime sessions take concurrent runs);
switching versions is choosing another dictionary, so swaps cost the inference thread nothing and
no version ever needs a re-export. Outputs equal the torch engine's within 1e-4 (tested).

Preprocessing (resize, timm data-config normalisation) is the torch engine's, on the CPU.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmlora.export.onnx import OnnxSpec, adapter_feeds, export_onnx, prompt_indices
from fmlora.model.model import FMLoRAModel
from fmlora.model.prompts import PromptChoice
from fmlora.model.snapshot import Snapshot, check_compatible
from server.core.backends.protocol import BackendInfo, probe_images, run_probe
from server.core.errors import InferenceError
from server.core.versions import PreparedVersion, VersionEntry

__all__ = ["OnnxBackend", "onnx_available"]

log = logging.getLogger("fmlora.server.onnx")

OPSET = 18
_EXPORT_FORMAT = 1  # bump when fmlora.export.onnx changes the graph's inputs or semantics


def onnx_available() -> str | None:
    """None when the ONNX backend can run here, else the reason it cannot."""
    missing = []
    for name in ("onnxruntime", "onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        return f"backend='onnx' needs the packages {', '.join(missing)} (pip install {' '.join(missing)})"
    return None


def _fingerprint(model: FMLoRAModel) -> str:
    import onnx
    import onnxscript

    digest = hashlib.sha256()
    for part in (
        model.backbone_sha256,
        model.config.model_dump_json(),
        torch.__version__,
        onnx.__version__,
        onnxscript.__version__,
        str(OPSET),
        str(_EXPORT_FORMAT),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:20]


@dataclass(frozen=True)
class _Feeds(PreparedVersion):
    feeds: dict[str, np.ndarray]


class OnnxBackend:
    name = "onnx"

    def __init__(self, model: FMLoRAModel, *, cache_dir: str | Path | None = None, threads: int | None = None):
        reason = onnx_available()
        if reason is not None:
            raise RuntimeError(reason)
        import onnxruntime as ort

        self.model = model.eval().to(device="cpu", dtype=torch.float32)
        self.model.unmerge()  # the graph holds the low-rank path; the torch copy is only checked against
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.input_size: tuple[int, int] = tuple(model.preprocessor.input_size)  # type: ignore[assignment]
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fmlora-onnx-")
            cache_dir = self._tmp.name
        self.spec = self._exported(Path(cache_dir))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        started = time.perf_counter()
        self.session = ort.InferenceSession(str(self.spec.path), options, providers=["CPUExecutionProvider"])
        self._ort_version = ort.__version__
        log.info("ONNX Runtime session ready in %.2f s (%s)", time.perf_counter() - started, self.spec.path.name)
        self.loaded: VersionEntry | None = None
        self.switches_total = 0
        self.last_switch_seconds: float | None = None

    def _exported(self, cache_dir: Path) -> OnnxSpec:
        cache_dir.mkdir(parents=True, exist_ok=True)
        stem = f"fmlora-{_fingerprint(self.model)}"
        graph, sidecar = cache_dir / f"{stem}.onnx", cache_dir / f"{stem}.json"
        if graph.is_file() and sidecar.is_file():
            try:
                spec = OnnxSpec.from_json(sidecar.read_text())
                return OnnxSpec(graph, spec.input_size, spec.adapter_inputs, spec.prompts, spec.outputs)
            except (ValueError, KeyError, OSError):
                log.warning("ignoring an unreadable ONNX export description %s", sidecar)
        started = time.perf_counter()
        log.info("exporting the model to ONNX (once per backbone and configuration) ...")
        spec = export_onnx(self.model, graph, opset=OPSET)
        tmp = sidecar.with_name(f".{sidecar.name}.tmp")
        tmp.write_text(spec.to_json())
        tmp.replace(sidecar)
        log.info("exported %s in %.1f s", graph.name, time.perf_counter() - started)
        return spec

    def describe(self) -> BackendInfo:
        return BackendInfo(
            backend=self.name,
            device="cpu",
            dtype="float32",
            onnxruntime=self._ort_version,
            onnx_graph=self.spec.path.name,
        )

    # -- versions (any thread) ---------------------------------------------------------------
    def check(self, snapshot: Snapshot) -> None:
        check_compatible(snapshot, self.model)

    def stage(self, snapshot: Snapshot) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype=torch.float32) for k, v in snapshot.tensors.items()}

    def prepare(self, entry: VersionEntry) -> _Feeds:
        prepared = _Feeds(adapter_feeds(self.model, entry.tensors))

        def forward(images: np.ndarray, choices: list[PromptChoice]) -> np.ndarray:
            index = prompt_indices(choices, entry.task_names) if self.spec.prompts else None
            return self._run(images, index, prepared.feeds)[0]

        run_probe(entry, self.input_size, forward)
        return prepared

    # -- inference thread --------------------------------------------------------------------
    def activate(self, entry: VersionEntry) -> None:
        if self.loaded is entry:
            return
        if not isinstance(entry.prepared, _Feeds):
            raise InferenceError(f"version {entry.version} was not prepared by the ONNX backend")
        started = time.perf_counter()
        self.loaded = entry
        self.switches_total += 1
        self.last_switch_seconds = time.perf_counter() - started

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.preprocessor(images)

    def _run(
        self, images: np.ndarray, prompt_index: np.ndarray | None, feeds: Mapping[str, np.ndarray]
    ) -> list[np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        run_feeds = dict(feeds)
        run_feeds["images"] = self.normalize(x).numpy()
        if self.spec.prompts:
            assert prompt_index is not None
            run_feeds["prompt_index"] = prompt_index
        return self.session.run(list(self.spec.outputs), run_feeds)

    def forward(self, images: np.ndarray, choices: list[PromptChoice]) -> tuple[torch.Tensor, torch.Tensor | None]:
        entry = self.loaded
        if entry is None or not isinstance(entry.prepared, _Feeds):
            raise InferenceError("no version is active in the ONNX backend")
        index = prompt_indices(choices, entry.task_names) if self.spec.prompts else None
        outputs = self._run(images, index, entry.prepared.feeds)
        logits = torch.from_numpy(outputs[0])
        query = torch.from_numpy(outputs[1]) if len(outputs) > 1 else None
        return logits, query

    def warm_bare(self, batch_sizes: Sequence[int]) -> None:
        """Run the graph once per batch size on a neutral adapter (zero update, one class, one task)."""
        shapes = self.model.expected_tensor_shapes(num_classes=1, num_tasks=1)
        tensors = {k: torch.zeros(s) for k, s in shapes.items()}
        if "prompts.task_keys" in tensors:
            tensors["prompts.task_keys"] = torch.ones(shapes["prompts.task_keys"])
            tensors["prompts.keys"] = torch.ones(shapes["prompts.keys"])
        feeds = adapter_feeds(self.model, tensors)
        for n in batch_sizes:
            images = probe_images(n, self.input_size)
            index = np.full(n, -1, dtype=np.int64) if self.spec.prompts else None
            (logits, *_) = self._run(images, index, feeds)
            if logits.shape != (n, 1) or not np.isfinite(logits).all():
                raise InferenceError("the ONNX graph produces unexpected outputs")

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

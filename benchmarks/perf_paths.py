"""The paths ``benchmarks.perf`` measures, each a runner with ``measure(batch, seconds, first)`` (one
round's additive figures and raw latencies) and ``close()``: the bare timm forward (the physical
limit), the model, the engine (one caller, and concurrent async callers), the HTTP path through a
real server, and the engine on ONNX Runtime."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.loadgen import encode_image, http_load, predict_body, random_images
from benchmarks.processes import ServerProcess, process_cpu_seconds, scrape_metrics
from benchmarks.publish import Publisher

__all__ = [
    "BareRunner",
    "EngineAsyncView",
    "EngineRunner",
    "HttpRunner",
    "ModelRunner",
    "http_concurrency",
    "onnx_unavailable",
    "timed_loop",
]


# -- timing ----------------------------------------------------------------------------------------
def timed_loop(
    step: Callable[[], Any],
    images_per_step: int,
    seconds: float,
    *,
    warmup: int = 2,
    min_iters: int = 1,
) -> dict[str, Any]:
    """Run ``step`` ``warmup`` times, then for ``seconds`` (at least ``min_iters`` times).

    Returns additive figures (images, wall_s, cpu_s) and the raw latencies (``_latencies``)."""
    for _ in range(warmup):
        step()
    latencies: list[float] = []
    started = time.perf_counter()
    cpu0 = time.process_time()
    while True:
        t0 = time.perf_counter()
        step()
        latencies.append(time.perf_counter() - t0)
        if len(latencies) >= min_iters and time.perf_counter() - started >= seconds:
            break
    return {
        "images": len(latencies) * images_per_step,
        "iterations": len(latencies),
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu0,
        "_latencies": latencies,
    }


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the paths: each a runner with measure(batch, seconds, first) and close() -----------------------
class BareRunner:
    """The bare timm forward (same architecture, head size, dtype, device) on a ready float tensor."""

    def __init__(self, config: Any, num_classes: int, batches: Sequence[int], device: Any, dtype: Any) -> None:
        import timm
        import torch

        bb = config.backbone
        torch.manual_seed(0)
        self.model = timm.create_model(bb.name, pretrained=False, num_classes=num_classes, **bb.model_kwargs)
        self.model = self.model.eval().to(device=device, dtype=dtype)
        size = tuple(self.model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:])
        if "img_size" in bb.model_kwargs:
            s = bb.model_kwargs["img_size"]
            size = (s, s) if isinstance(s, int) else tuple(s)
        gen = torch.Generator().manual_seed(0)
        self.inputs = {b: torch.randn((b, 3, *size), generator=gen).to(device=device, dtype=dtype) for b in batches}
        self.device = device

    def measure(self, batch: int, seconds: float, first: bool) -> dict[str, Any]:
        import torch

        x, model, device = self.inputs[batch], self.model, self.device

        def step() -> None:
            with torch.inference_mode():
                model(x)
            _sync(device)

        return timed_loop(step, batch, seconds, warmup=2 if first else 0)

    def close(self) -> None:
        del self.model, self.inputs


class ModelRunner:
    """FMLoRAModel with the live snapshot, merged, ``forward_detailed(x, 'auto')`` on a float tensor."""

    def __init__(self, bench: Publisher, batches: Sequence[int], device: Any, dtype: Any) -> None:
        import torch

        from fmlora.model import FMLoRAModel
        from fmlora.model.snapshot import load_snapshot

        model = FMLoRAModel(bench.registry.model_config)
        load_snapshot(model, bench.registry.snapshot_dir(bench.registry.live_version()))
        self.model = model.eval().to(device=device, dtype=dtype)
        self.model.merge()
        size = tuple(model.preprocessor.input_size)
        gen = torch.Generator().manual_seed(0)
        self.inputs = {
            b: model.preprocessor(torch.randint(0, 256, (b, 3, *size), dtype=torch.uint8, generator=gen)).to(device)
            for b in batches
        }
        self.device = device

    def measure(self, batch: int, seconds: float, first: bool) -> dict[str, Any]:
        import torch

        x, model, device = self.inputs[batch], self.model, self.device

        def step() -> None:
            with torch.inference_mode():
                model.forward_detailed(x, "auto")
            _sync(device)

        return timed_loop(step, batch, seconds, warmup=2 if first else 0)

    def close(self) -> None:
        del self.model, self.inputs


class EngineRunner:
    """``Engine.predict_sync`` with one request of ``batch`` uint8 images (model input size) at a time;
    ``max_wait_ms=0``, so a request never waits for company."""

    def __init__(self, bench: Publisher, batches: Sequence[int], device: str, dtype: str, backend: str) -> None:
        from server.core.engine import Engine, EngineConfig

        cfg = EngineConfig(
            device=device,
            dtype=dtype,  # type: ignore[arg-type]
            backend=backend,  # type: ignore[arg-type]
            max_batch_size=max(batches),
            max_wait_ms=0.0,
            max_queue=max(256, 2 * max(batches)),
            request_timeout_s=600.0,
            watch=False,
            warmup_batch_sizes=tuple(sorted(set(batches))),
        )
        self.engine = Engine(bench.registry, cfg)
        t0 = time.perf_counter()
        self.engine.start()
        if self.engine.serving_version is None:
            self.engine.stop()
            raise RuntimeError("the engine serves no version")
        size = self.engine.input_size
        assert size is not None
        self.info = {"start_s": round(time.perf_counter() - t0, 3), "describe": self.engine.describe()}
        self.images = {b: random_images(b, size, seed=b) for b in batches}

    def measure(self, batch: int, seconds: float, first: bool) -> dict[str, Any]:
        engine, images = self.engine, self.images[batch]

        def step() -> None:
            pred = engine.predict_sync(images, top_k=5, prompt="auto")
            if len(pred.results) != batch:
                raise RuntimeError(f"{len(pred.results)} results for {batch} images")

        before = engine.stats()
        result = timed_loop(step, batch, seconds, warmup=2 if first else 0)
        after = engine.stats()
        result["engine_batches"] = after.get("batches_total", 0) - before.get("batches_total", 0)
        result["engine_items"] = after.get("items_total", 0) - before.get("items_total", 0)
        return result

    def measure_async(self, batch: int, seconds: float, first: bool, concurrency: int) -> dict[str, Any]:
        """``concurrency`` asyncio callers of ``Engine.predict`` (as the server's request handlers call
        it): resizing in the engine's thread pool overlaps the forward of the batch before."""
        engine, images = self.engine, self.images[batch]

        async def go(duration: float, min_calls: int) -> list[float]:
            latencies: list[float] = []
            deadline = time.perf_counter() + duration

            async def caller() -> None:
                calls = 0
                while time.perf_counter() < deadline or calls < min_calls:
                    t0 = time.perf_counter()
                    pred = await engine.predict(images, top_k=5, prompt="auto")
                    latencies.append(time.perf_counter() - t0)
                    calls += 1
                    if len(pred.results) != batch:
                        raise RuntimeError(f"{len(pred.results)} results for {batch} images")

            await asyncio.gather(*(caller() for _ in range(concurrency)))
            return latencies

        if first:
            asyncio.run(go(0.0, 1))
        before = engine.stats()
        started, cpu0 = time.perf_counter(), time.process_time()
        latencies = asyncio.run(go(seconds, 1))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
        after = engine.stats()
        return {
            "images": len(latencies) * batch,
            "iterations": len(latencies),
            "wall_s": wall,
            "cpu_s": cpu,
            "concurrency": concurrency,
            "engine_batches": after.get("batches_total", 0) - before.get("batches_total", 0),
            "engine_items": after.get("items_total", 0) - before.get("items_total", 0),
            "_latencies": latencies,
        }

    def close(self) -> None:
        self.engine.stop(10.0)


class EngineAsyncView:
    """The ``engine_async`` path: the ``engine`` runner's engine under concurrent async callers."""

    def __init__(self, runner: EngineRunner, max_batch: int, concurrency: str) -> None:
        self.runner, self.max_batch, self.concurrency = runner, max_batch, concurrency
        self.info = {"shares_engine_with": "engine"}

    def measure(self, batch: int, seconds: float, first: bool) -> dict[str, Any]:
        c = http_concurrency(batch, self.max_batch, self.concurrency)
        return self.runner.measure_async(batch, seconds, first, c)

    def close(self) -> None:
        pass  # the engine runner stops the engine


def http_concurrency(batch: int, max_batch: int, setting: str) -> int:
    """Clients for requests of ``batch`` images: ``auto`` keeps about two full model batches in flight."""
    if setting != "auto":
        return max(1, int(setting))
    return max(2, math.ceil(max_batch / batch))


class HttpRunner:
    """A real server subprocess (``fmlora serve``); ``concurrency`` asyncio httpx clients in this process
    post JSON requests of ``batch`` pre-encoded images to POST /predict back to back."""

    def __init__(
        self,
        bench: Publisher,
        batches: Sequence[int],
        device: str,
        dtype: str,
        *,
        concurrency: str = "auto",
        image_format: str = "jpeg",
        threads: int | None = None,
        log_path: Path | None = None,
        launcher: str = "auto",
    ) -> None:
        self.max_batch = max(batches)
        self.settings = {
            "device": device,
            "dtype": dtype,
            "max_batch_size": self.max_batch,
            "max_images_per_request": self.max_batch,
            "max_queue": max(256, 4 * self.max_batch),
            "request_timeout_s": 600,
        }
        self.concurrency_setting = concurrency
        size = tuple(bench.model.preprocessor.input_size)
        self.bodies = {
            b: [
                predict_body([encode_image(im, image_format) for im in random_images(b, size, seed=100 * b + k)])
                for k in range(4)
            ]
            for b in batches
        }
        # Launched now, waited for in ready(): the server starts while the other paths set up.
        self.server = ServerProcess(
            bench.registry.home, settings=self.settings, threads=threads, log_path=log_path, launcher=launcher
        ).start(wait=False)
        self.info: dict[str, Any] = {"launcher": self.server.used_launcher, "settings": self.settings}

    def ready(self) -> None:
        self.server.wait_ready()
        self.info["start_s"] = round(self.server.started_in_s or 0.0, 3)
        with contextlib.suppress(Exception):
            self.info["server_info"] = self.server.get_json("/info")

    def measure(self, batch: int, seconds: float, first: bool) -> dict[str, Any]:
        server, bodies = self.server, self.bodies[batch]
        c = http_concurrency(batch, self.max_batch, self.concurrency_setting)
        if first:  # every client once: connections open, server paths warm
            http_load(
                server.url, bodies, concurrency=c, seconds=0.0, images_per_request=batch, min_requests_per_client=1
            )
        m0, cpu0 = scrape_metrics(server.url), process_cpu_seconds(server.pid)
        load = http_load(
            server.url, bodies, concurrency=c, seconds=seconds, images_per_request=batch, min_requests_per_client=1
        )
        m1, cpu1 = scrape_metrics(server.url), process_cpu_seconds(server.pid)
        if not server.alive():
            raise RuntimeError(f"the server died during the run:\n{server.log_tail()}")

        def delta(name: str) -> float:
            return m1.get(name, 0.0) - m0.get(name, 0.0)

        return {
            "images": load.ok * batch,
            "iterations": load.requests,
            "wall_s": load.wall_s,
            "cpu_s": load.client_cpu_s,
            "concurrency": c,
            "statuses": {str(k): v for k, v in load.statuses.items()},
            "request_bytes": round(sum(len(x) for x in bodies) / len(bodies)),
            "server_batches": delta("fmlora_batch_size_count"),
            "server_items": delta("fmlora_batch_size_sum"),
            "server_model_s": delta("fmlora_batch_duration_seconds_sum"),
            "server_cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
            "_latencies": load.latencies_s,
        }

    def close(self) -> None:
        self.server.stop()


def onnx_unavailable(device: str) -> str | None:
    """Why the ONNX path cannot run here (None when it can)."""
    if importlib.util.find_spec("server.core.backends.onnx") is None:
        return "server/core/backends/onnx.py does not exist (no ONNX backend in this checkout)"
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    if device.startswith("cuda"):
        return "the ONNX backend runs on CPU only"
    return None

"""Training cost over a long task stream: seconds per task and per epoch, trainable parameters and
adapter bytes per task, for FM-LoRA, sequential LoRA and a per-task-adapter scheme (InfLoRA-style).

FM-LoRA and sequential LoRA are trained for real on the offline glyph benchmark split into
``--tasks`` tasks; their sizes are measured from the tensors a snapshot would hold. The per-task-adapter
scheme (one new rank-r LoRA pair per adapted matrix per task, as InfLoRA/SD-LoRA grow) is computed from
the same adapter layout, since its cost is arithmetic: it is labelled ``analytic`` in the output.

    python -m benchmarks.training_cost --out runs/training-cost [--tasks 20] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.plots import pyplot, save
from benchmarks.report import write_json
from fmlora.data import make_glyph_stream
from fmlora.model import FMLoRAModel, ModelConfig
from fmlora.training import Learner, TrainConfig, apply_strategy

CONSTANT = ("adapter.", "prompts.bank", "prompts.keys")


def tensor_bytes(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...] | None = None) -> int:
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if prefixes is None or k.startswith(prefixes))


def per_task_adapter_params(model: FMLoRAModel) -> int:
    """Parameters of one new rank-r LoRA pair on every adapted matrix (what a per-task scheme adds per task)."""
    total = 0
    for layer in model.adapted.values():
        for adapter in layer.adapters.values():
            rank, fan_in = adapter.lora_A.shape
            fan_out = adapter.lora_B.shape[0]
            total += rank * (fan_in + fan_out)
    return total


def run_method(method: str, tasks: list[Any], train: TrainConfig) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = FMLoRAModel(apply_strategy(method, ModelConfig()))
    learner = Learner(train)
    rows = []
    for t, task in enumerate(tasks):
        report = learner.learn_task(model, task)
        tensors = model.adapter_tensors()
        rows.append(
            {
                "task": t + 1,
                "seconds": report.seconds,
                "seconds_per_epoch": report.seconds / report.epochs,
                "train_images": len(task.train),
                "trainable_parameters": report.trainable_parameters,
                "adapter_bytes": tensor_bytes(tensors, CONSTANT),
                "snapshot_tensor_bytes": tensor_bytes(tensors),
                "rank": report.task.rank,
            }
        )
        print(
            f"{method:>9} task {t + 1:>2}: {report.seconds:6.1f} s, {report.trainable_parameters:>7} trainable, "
            f"adapter {rows[-1]['adapter_bytes']:,} B",
            flush=True,
        )
    return rows


def per_task_scheme(tasks: list[Any]) -> list[dict[str, Any]]:
    model = FMLoRAModel(ModelConfig())
    per_task = per_task_adapter_params(model)
    return [
        {"task": t + 1, "trainable_parameters": per_task, "adapter_bytes": 4 * per_task * (t + 1), "analytic": True}
        for t in range(len(tasks))
    ]


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    fig, axes = pyplot().subplots(1, 3, figsize=(14, 4))
    for name, rows in results.items():
        xs = [r["task"] for r in rows]
        style = "--" if rows and rows[0].get("analytic") else "-"
        axes[0].plot(xs, [r["adapter_bytes"] / 1024 for r in rows], style, marker="o", ms=3, label=name)
        axes[1].plot(xs, [r["trainable_parameters"] for r in rows], style, marker="o", ms=3, label=name)
        if "seconds" in rows[0]:
            axes[2].plot(xs, [r["seconds"] for r in rows], marker="o", ms=3, label=name)
    axes[0].set(title="Adapter size after each task", xlabel="tasks learned", ylabel="KiB (fp32)")
    axes[1].set(title="Trainable parameters per task", xlabel="task", ylabel="parameters")
    axes[2].set(title="Training time per task", xlabel="task", ylabel="seconds")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--methods", default="fmlora,seq-lora")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    tasks = make_glyph_stream("class", args.tasks, train_per_class=args.train_per_class, test_per_class=1)
    train = TrainConfig(epochs=args.epochs, batch_size=32, lr=2e-3, progress_bar=False)
    results: dict[str, list[dict[str, Any]]] = {}
    for method in args.methods.split(","):
        results[method] = run_method(method, tasks, train)
    results["per-task adapters (InfLoRA-style, analytic)"] = per_task_scheme(tasks)

    summary = {
        name: {
            "adapter_bytes_first": rows[0]["adapter_bytes"],
            "adapter_bytes_last": rows[-1]["adapter_bytes"],
            "trainable_parameters_task1": rows[0]["trainable_parameters"],
            "trainable_parameters_later_mean": sum(r["trainable_parameters"] for r in rows[1:]) / max(1, len(rows) - 1),
            **(
                {
                    "seconds_per_task_mean": sum(r["seconds"] for r in rows) / len(rows),
                    "seconds_per_epoch_mean": sum(r["seconds_per_epoch"] for r in rows) / len(rows),
                }
                if "seconds" in rows[0]
                else {}
            ),
        }
        for name, rows in results.items()
    }
    payload = {
        "benchmark": "training-cost",
        "stream": {"tasks": args.tasks, "classes_per_task": 100 // args.tasks, "train_per_class": args.train_per_class},
        "train": train.model_dump(mode="json"),
        "summary": summary,
        "per_task": results,
    }
    write_json(args.out / "training_cost.json", payload)
    plot(results, args.out / "training_cost.png")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'training_cost.json'} and training_cost.png ({time.process_time():.0f} s CPU)")


if __name__ == "__main__":
    main()

"""Linear probe of a backbone's frozen features on the glyph benchmark's 100 classes (all faces).

    python -m benchmarks.probe_backbone --out runs/probe [--weights PATH]

Writes probe.json: accuracy for the given (default: shipped) glyph ViT and for the same architecture
with random weights, which is what pre-training must beat.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.report import write_json
from fmlora.data.glyphs import make_glyph_stream
from fmlora.data.images import ImageSet
from fmlora.model import BackboneConfig
from fmlora.training.pretrain import linear_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", type=Path, default=None, help="glyph ViT weights (default: shipped)")
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=10)
    args = parser.parse_args()
    offline = BackboneConfig.offline()
    if args.weights is not None:
        offline = offline.model_copy(update={"weights_path": args.weights})
    tasks = make_glyph_stream("class", 1, args.train_per_class, args.test_per_class, seed=0)
    train, test = tasks[0].train, tasks[0].test
    assert isinstance(train, ImageSet) and isinstance(test, ImageSet)
    started = time.perf_counter()
    result = {
        "classes": len(train.classes),
        "train_images": len(train),
        "test_images": len(test),
        "pretrained": linear_probe(offline, train, test),
        "random_init": linear_probe(
            offline.model_copy(update={"weights": "random", "weights_path": None}), train, test
        ),
        "weights": str(offline.weights_path),
    }
    result["seconds"] = time.perf_counter() - started
    write_json(args.out / "probe.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

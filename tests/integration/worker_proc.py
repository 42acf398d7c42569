"""A worker in its own process, for crash tests: ``python -m tests.integration.worker_proc HOME [KILL_AT]``.

The registry is FMLORA_REGISTRY_URL's (SQLite in HOME when unset); EPOCHS (default 2) sets the
epochs per task, LEASE_TTL the lease's seconds.

KILL_AT names a stage at which the process SIGKILLs itself: ``progress`` (mid-epoch), ``publishing``
(inside the snapshot write, after the tensor file and before the objects are stored) or ``written``
(objects stored, before the version row is committed).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

from fmlora.registry.registry import Registry
from fmlora.training import TrainConfig
from fmlora.worker.worker import Worker, WorkerConfig


def main() -> None:
    home = sys.argv[1]
    kill_at = sys.argv[2] if len(sys.argv) > 2 else ""
    logging.basicConfig(level=logging.INFO)

    def on_stage(stage: str, info: dict[str, Any]) -> None:
        print(f"STAGE {stage} {info}", flush=True)
        if stage == kill_at == "publishing":
            import fmlora.model.snapshot as snapshot

            real_save = snapshot.save_file

            def save_then_die(*args: Any, **kwargs: Any) -> None:
                real_save(*args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)

            snapshot.save_file = save_then_die
        elif stage == kill_at and (stage != "progress" or info.get("step", 0) >= 2):
            os.kill(os.getpid(), signal.SIGKILL)

    config = WorkerConfig(
        train=TrainConfig(epochs=int(os.environ.get("EPOCHS", "2")), batch_size=8, lr=3e-3, progress_bar=False),
        lease_ttl_s=float(os.environ.get("LEASE_TTL", "3")),
        heartbeat_s=0.5,
        poll_interval_s=0.2,
        progress_interval_s=0.0,
    )
    registry = Registry.open(home, registry_url=os.environ.get("FMLORA_REGISTRY_URL") or None)
    worker = Worker(registry, config, on_stage=on_stage)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    worker.run_forever(exit_when_idle=True)
    print(f"EXIT {worker.id}", flush=True)


if __name__ == "__main__":
    main()

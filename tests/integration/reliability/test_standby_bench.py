"""The standby benchmark, bounded: real ``fmlora worker`` processes on both backends, the lease holder
SIGKILLed three times at random points. No task is lost, each finished task has one version, version
numbers only grow, and the store holds no snapshot without a complete, recorded version."""

from __future__ import annotations

from benchmarks.standby import run
from tests.integration.registry.services import registry_url  # noqa: F401 - fixture

TASKS = 8


def test_three_kills_of_the_active_worker_lose_nothing(registry_url: str | None) -> None:  # noqa: F811
    # The run keeps tasks queued until the last kill, so the kills land however fast tiny tasks train.
    result = run(kills=3, tasks=TASKS, seed=1, timeout_s=600, registry_url=registry_url)
    assert result["registry"] == ("sqlite" if registry_url is None else "postgresql")
    assert result["kills_made"] == 3 and not result["ran_out_of_tasks"]
    assert result["workers_started"] == 2 + 3
    tasks = result["tasks"]
    assert tasks["submitted"] >= TASKS and tasks["lost"] == 0 and tasks["queued"] == tasks["mid_training"] == 0
    assert tasks["failed"] == 0  # a holder on its task's last attempt is spared, so no task hits the guard
    assert tasks["live"] + tasks["rejected"] == tasks["submitted"]
    versions = result["versions"]
    assert versions["count"] == tasks["submitted"] and versions["strictly_increasing"] and versions["duplicates"] == []
    assert versions["partial_snapshots"] == [] and versions["recorded_without_objects"] == []
    assert all(result["checks"].values()) and result["passed"]

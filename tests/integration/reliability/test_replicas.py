"""The replicas benchmark, bounded: two real ``fmlora serve`` replicas on the throwaway PostgreSQL and
moto's S3, a few publishes and a rollback under load. Every replica converges on every version, no
request fails, no replica answers from a version it had already replaced."""

from __future__ import annotations

from benchmarks.replicas import run
from tests.integration.registry.services import postgres_cluster


def test_replicas_converge_without_failed_requests_or_regressions(tmp_path):
    postgres_cluster()  # fails under CI=true, skips elsewhere, when PostgreSQL cannot start
    result = run(publishes=3, rollbacks=1, replicas=2, throughput_s=1.0, work=tmp_path)
    assert result["setup"]["publishes"] + result["setup"]["rollbacks"] == 4
    assert result["convergence"]["not_converged"] == 0 and result["convergence"]["max_ms"] < 10_000
    # The replicas' own swap times: none unknown, none after the poll that saw the version.
    assert result["convergence_swapped"]["unknown"] == 0
    for event in result["events"]:
        assert event["swapped_s"] <= event["converged_s"] + 0.001
    assert {"registry", "fetch", "probe", "swap"} <= set(result["swap_stages"])
    assert result["requests"]["total"] > 0 and result["requests"]["failed"] == 0
    assert result["regressions"] == 0
    throughput = result["throughput"]
    assert throughput["postgresql_failed"] == 0 and throughput["sqlite_failed"] == 0
    assert throughput["ratio_postgresql_over_sqlite"] is not None

"""Fuzzing the HTTP API: schemathesis over every route of the OpenAPI schema, and a Pillow-level image
fuzz on ``POST /predict``; the target is zero 5xx and a server that is still ready afterwards.

1. ``schema``: the schema the server serves (``/openapi.json``; compared with the committed
   ``openapi.json`` when there is one) is loaded with schemathesis and every operation gets
   ``--max-examples`` schema-valid and as many schema-invalid generated requests (Hypothesis, seeded
   with ``--seed``), sent with the admin key (which every route accepts), then a quarter as many
   without the key (the 401/403 paths). Every status is counted; any 5xx or missing response is a
   failure. schemathesis' own conformance checks (response schema, documented status codes) run too
   and are reported, not counted as failures.
2. ``boundary``: edge values (0, -1, 2^31, 2^63-1, 2^63, 10^30, non-numbers; long, dotted, encoded
   strings) in every path and query parameter, one parameter at a time.
3. ``images``: a corpus made with Pillow — random bytes, truncated PNG/JPEG/GIF/WebP/BMP/TIFF, bytes
   flipped in headers and bodies, huge declared dimensions (PNG, JPEG, GIF, BMP headers that claim
   20,000+ px sides, and a real 48-megapixel bilevel PNG), 1x1 images, palette/alpha/16-bit/32-bit/
   float/CMYK modes, EXIF orientations 1-8 and broken EXIF, animated and multi-page files, formats the
   server does not accept, bad base64 and data URLs — each sent as JSON base64 and as a multipart file.
   Every answer must be 200 or a 4xx with the error envelope; valid images must get 200
   (``benchmarks.fuzz_images``).

    python -m benchmarks.fuzz --out runs/fuzz [--max-examples 100]

Writes ``fuzz.json`` in ``--out``. ``--url URL --key KEY`` fuzzes a server that is already running.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import REPO
from benchmarks.fuzz_images import count_statuses, image_cases, run_image_fuzz
from benchmarks.report import write_json

__all__ = ["FuzzConfig", "run_boundary_probes", "run_fuzz", "run_schema_fuzz"]


@dataclass
class FuzzConfig:
    out: Path
    max_examples: int = 100
    image_mutations: int | None = None  # mutated images (default: max_examples)
    url: str | None = None  # fuzz a running server instead of starting one
    key: str | None = None  # its admin key
    backbone: str = "offline"
    device: str = "cpu"
    threads: int | None = 1
    seed: int = 0
    timeout_s: float = 60.0
    unauthenticated: bool = True
    schema: bool = True  # run schemathesis (needs the schemathesis package)
    operations: tuple[str, ...] | None = None  # e.g. ("POST /predict",); default: every operation


# -- boundary values for path and query parameters ----------------------------------------------------
INT_EDGES: tuple[Any, ...] = (0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, "abc", "1e3", "1.5", "")
STR_EDGES: tuple[str, ...] = ("..", "%2e%2e", "a" * 4000, "null", "é✓", "%00", " ", "-1")


def run_boundary_probes(url: str, key: str, schema: dict[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
    """Edge values (0, -1, 2^63, 10^30, non-numbers, long and odd strings) in every path and query
    parameter of every operation, one at a time; any 5xx is a failure."""
    import urllib.parse

    import httpx

    rows: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, timeout=timeout_s, headers=headers) as http:
        for path, item in sorted(schema.get("paths", {}).items()):
            for method, op in sorted(item.items()):
                if method not in ("get", "post"):
                    continue
                params = op.get("parameters", [])
                defaults = {
                    p["name"]: "1" if p.get("schema", {}).get("type") == "integer" else "x"
                    for p in params
                    if p.get("in") == "path"
                }
                for p in params:
                    if p.get("in") not in ("path", "query"):
                        continue
                    kind = p.get("schema", {}).get("type")
                    values = INT_EDGES if kind == "integer" else STR_EDGES
                    for value in values:
                        filled = dict(defaults)
                        query = {}
                        if p["in"] == "path":
                            filled[p["name"]] = urllib.parse.quote(str(value), safe="%")
                        else:
                            query[p["name"]] = str(value)
                        target = path
                        for name, text in filled.items():
                            target = target.replace("{" + name + "}", text)
                        try:
                            response = http.request(method.upper(), target, params=query)
                            status, text = response.status_code, response.text[:200]
                        except httpx.HTTPError as exc:
                            status, text = 0, type(exc).__name__
                        rows.append(
                            {
                                "operation": f"{method.upper()} {path}",
                                "parameter": p["name"],
                                "value": str(value)[:40],
                                "status": status,
                                "detail": text if status >= 500 or status == 0 else "",
                            }
                        )
    errors = [r for r in rows if r["status"] >= 500 or r["status"] == 0]
    return {
        "requests": len(rows),
        "statuses": count_statuses(rows),
        "server_errors": len(errors),
        "server_error_examples": errors[:20],
    }


# -- schemathesis ----------------------------------------------------------------------------------------
def run_schema_fuzz(
    url: str,
    key: str | None,
    max_examples: int,
    *,
    seed: int = 0,
    timeout_s: float = 60.0,
    operations: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every operation of the served schema, ``max_examples`` schema-valid and as many schema-invalid
    generated cases each (with ``key`` as a bearer token, or none), seeded with ``seed``. Returns
    status counts per operation and every 5xx case."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=timeout_s)
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    skipped: list[str] = []
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    per_op: dict[str, dict[str, int]] = {}
    server_errors: list[dict[str, Any]] = []
    conformance: dict[str, dict[str, int]] = {}
    load_errors: list[str] = []
    for result in schema.get_all_operations():
        try:
            op = result.ok()
        except Exception as exc:  # an operation schemathesis cannot read is itself a finding
            load_errors.append(f"{type(exc).__name__}: {exc}"[:300])
            continue
        label = f"{op.method.upper()} {op.path}"
        if operations is not None and label not in operations:
            continue
        counts = per_op.setdefault(label, {})
        issues = conformance.setdefault(label, {})

        for mode in modes:
            test = _probe(op, mode, label, url, headers, timeout_s, max_examples, seed, counts, issues, server_errors)
            try:
                test()
            except Exception as exc:  # e.g. no negative case exists for an operation without inputs
                skipped.append(f"{label} ({mode.value}): {type(exc).__name__}: {exc}"[:300])
    total = sum(sum(c.values()) for c in per_op.values())
    return {
        "operations": sorted(per_op),
        "requests": total,
        "statuses": per_op,
        "server_errors": len(server_errors),
        "server_error_examples": server_errors[:20],
        "conformance_findings": {k: v for k, v in conformance.items() if v},
        "operations_not_loaded": load_errors,
        "generation_skipped": skipped,
        "authenticated": bool(key),
    }


def _probe(
    op: Any,
    mode: Any,
    label: str,
    url: str,
    headers: dict[str, str],
    timeout_s: float,
    max_examples: int,
    seed: int,
    counts: dict[str, int],
    issues: dict[str, int],
    server_errors: list[dict[str, Any]],
) -> Any:
    """A Hypothesis test over ``op``'s generated cases that records every answer (it never fails)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from schemathesis.errors import FailureGroup

    @hypothesis_seed(seed)
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def probe(case: Any) -> None:
        response = None
        detail = ""
        try:
            response = case.call(base_url=url, headers=headers, timeout=timeout_s)
            status = response.status_code
        except Exception as exc:
            status, detail = 0, type(exc).__name__
        counts[str(status)] = counts.get(str(status), 0) + 1
        if status >= 500 or status == 0:
            server_errors.append(
                {
                    "operation": label,
                    "mode": mode.value,
                    "status": status,
                    "path_parameters": _short(case.path_parameters),
                    "query": _short(case.query),
                    "body": _short(case.body),
                    "media_type": case.media_type,
                    "response": response.text[:300] if response is not None else detail,
                }
            )
            return
        try:
            case.validate_response(response)
        except (Exception, FailureGroup) as exc:  # conformance findings: reported, not failures
            for failure in getattr(exc, "exceptions", None) or [exc]:
                name = getattr(failure, "title", None) or type(failure).__name__
                issues[name] = issues.get(name, 0) + 1

    return probe


def _short(value: Any, limit: int = 300) -> Any:
    if value is None:
        return None
    try:
        text = json.dumps(value, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _schema_drift(served: dict[str, Any]) -> bool | None:
    committed = REPO / "openapi.json"
    if not committed.is_file():
        return None
    try:
        return json.loads(committed.read_text(encoding="utf-8")) == served
    except (OSError, ValueError):
        return False


# -- the run -------------------------------------------------------------------------------------------------
def run_fuzz(cfg: FuzzConfig) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    mutations = cfg.image_mutations if cfg.image_mutations is not None else cfg.max_examples
    if cfg.url:
        return _fuzz(cfg, out, cfg.url, cfg.key or "", None, mutations)
    from benchmarks.processes import ServerProcess
    from benchmarks.publish import make_home

    work = Path(tempfile.mkdtemp(prefix="fmlora-fuzz-"))
    try:
        publisher = make_home(work / "home", cfg.backbone, tasks=0, classes_per_task=2, seed=cfg.seed)
        publisher.publish(new_task=True, name="letters")
        publisher.publish(new_task=True, name="digits")
        settings = {"device": cfg.device, "api_key": "fuzz-api-key-" + "0" * 16, "poll_interval_s": 0.1}
        with ServerProcess(
            work / "home", settings=settings, threads=cfg.threads, log_path=out / "server.log"
        ) as server:
            return _fuzz(cfg, out, server.url, server.admin_key, server, mutations)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fuzz(cfg: FuzzConfig, out: Path, url: str, key: str, server: Any, mutations: int) -> dict[str, Any]:
    import httpx

    started = time.monotonic()
    served = httpx.get(f"{url}/openapi.json", timeout=cfg.timeout_s).json()
    ops = cfg.operations
    schema_auth: dict[str, Any] = {"operations": [], "server_errors": 0, "server_error_examples": [], "skipped": True}
    if cfg.schema:
        schema_auth = run_schema_fuzz(
            url, key, cfg.max_examples, seed=cfg.seed, timeout_s=cfg.timeout_s, operations=ops
        )
    schema_anon = None
    if cfg.schema and cfg.unauthenticated:
        schema_anon = run_schema_fuzz(
            url, None, max(1, cfg.max_examples // 4), seed=cfg.seed, timeout_s=cfg.timeout_s, operations=ops
        )
    schema_seconds = time.monotonic() - started
    boundary = run_boundary_probes(url, key, served, cfg.timeout_s)
    cases = image_cases(cfg.seed, mutations)
    images = run_image_fuzz(url, key, cases, cfg.timeout_s)
    ready_status = httpx.get(f"{url}/readyz", timeout=cfg.timeout_s).status_code
    alive = server.alive() if server is not None else None
    server_errors = (
        schema_auth["server_errors"]
        + (schema_anon["server_errors"] if schema_anon else 0)
        + boundary["server_errors"]
        + images["server_errors"]
    )
    result = {
        "benchmark": "fuzz",
        "target": "zero 5xx; the server stays ready",
        "verdict": {
            "zero_5xx": server_errors == 0,
            "server_errors": server_errors,
            "ready_after": ready_status == 200,
            "server_alive": alive,
            "valid_images_accepted": images["valid_refused"] == 0,
            "error_envelopes_ok": images["bad_envelopes"] == 0,
        },
        "schema": {
            "source": "served /openapi.json",
            "matches_committed_openapi_json": _schema_drift(served),
            "operations": len(schema_auth["operations"]),
            "max_examples": cfg.max_examples,
            "seconds": round(schema_seconds, 2),
            "with_admin_key": schema_auth,
            "without_key": schema_anon,
        },
        "boundary": boundary,
        "images": {k: v for k, v in images.items() if k != "rows"},
        "image_rows": images["rows"],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "key"},
    }
    write_json(out / "fuzz.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-examples", type=int, default=100, help="schemathesis examples per operation")
    p.add_argument("--image-mutations", type=int, default=None, help="mutated images (default: --max-examples)")
    p.add_argument("--url", default=None, help="fuzz a running server instead of starting one")
    p.add_argument("--key", default=None, help="the running server's admin key (with --url)")
    p.add_argument("--backbone", default="offline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = FuzzConfig(
        out=args.out,
        max_examples=args.max_examples,
        image_mutations=args.image_mutations,
        url=args.url,
        key=args.key,
        backbone=args.backbone,
        device=args.device,
        threads=args.threads or None,
        seed=args.seed,
    )
    result = run_fuzz(cfg)
    print(json.dumps({"verdict": result["verdict"], "image_statuses": result["images"]["statuses"]}, indent=2))
    for example in result["schema"]["with_admin_key"]["server_error_examples"][:5]:
        print("5xx:", json.dumps(example)[:400])
    for example in result["boundary"]["server_error_examples"][:10]:
        print("5xx:", json.dumps(example)[:400])
    for example in result["images"]["server_error_examples"][:5]:
        print("5xx:", json.dumps(example)[:400])
    return 0 if result["verdict"]["zero_5xx"] and result["verdict"]["ready_after"] else 1


if __name__ == "__main__":
    sys.exit(main())

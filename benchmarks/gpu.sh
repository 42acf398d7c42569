#!/usr/bin/env bash
# The GPU benchmark run: one prepared script for an H200 session (issue 8, item 7).
#
# It runs the serving-efficiency benchmark (benchmarks.perf: vit_base_patch16_224, bf16, CUDA, batches
# 1/8/32), the hot-swap benchmark (benchmarks.swap) and the memory soak (benchmarks.soak, GPU memory
# included), each as `python -m benchmarks.<name>` from the repository root, with bounded
# durations (about 8 minutes in all, under the device tool's 10-minute limit per command), records the
# machine (nvidia-smi, torch, CPU) and whether ViT weights or datasets are cached there, and writes
# everything under $OUT. It installs nothing from the network: the device machine reaches nothing.
#
# What the device machine lacks is carried as wheels. Its image has python3 3.12 with torch, timm,
# numpy, pillow, safetensors, httpx, matplotlib, prometheus-client (see /work/.library/device/KINDS.md)
# but not pydantic, fastapi, starlette, uvicorn, pydantic-settings or python-multipart. torch itself
# is NOT carried (a CUDA torch wheel is far over the 64 MiB the tool carries; the image's torch is
# used, whatever the project pins).
#
# 1. Here, once, in the repository root (downloads ~5 MB of wheels into .whl/, ignored by git):
#        bash benchmarks/gpu.sh --prepare
# 2. With the device tool (one call; timeout_s leaves room for the machine's start):
#        run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=600)
#    The results come back in $OUT (at most 8 files): gpu.log, env.txt, perf.json, perf-*.png,
#    swap/soak JSON, and results.tar.gz with everything (each benchmark's folder, server logs).
#
# Environment knobs: GPU_BUDGET_S (total seconds, default 540), PERF_SECONDS (6), SWAPS (100),
# SOAK_SWAPS (400), BACKBONE (vit_base_patch16_224), DEVICE (cuda), DTYPE (bfloat16), SKIP (comma
# list of perf,swap,soak). A plumbing check without a GPU: DEVICE=cpu DTYPE=float32 BACKBONE=tiny
# PERF_SECONDS=1 SWAPS=3 SOAK_SWAPS=5 OUT=runs/gpu-dry bash benchmarks/gpu.sh
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
WHEELS="$REPO/.whl"

# Wheels the device image lacks (or has in too old a version), pinned to what the project tests with.
CARRIED="pydantic pydantic-core annotated-types typing-inspection typing-extensions pydantic-settings
python-dotenv fastapi starlette uvicorn python-multipart annotated-doc opentelemetry-api typer
prometheus-client"

if [[ "${1:-}" == "--prepare" ]]; then
    PY="${PYTHON:-$REPO/.venv/bin/python}"
    [[ -x "$PY" ]] || PY=python3
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    mkdir -p "$WHEELS"
    specs=$("$PY" - "$CARRIED" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
out = []
for name in sys.argv[1].split():
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        out.append(name)
print(" ".join(out))
EOF
)
    echo "downloading into .whl/: $specs"
    # shellcheck disable=SC2086
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" $specs || exit 1
    du -sh "$WHEELS"
    ls "$WHEELS"
    echo "ready: run(command=\"bash benchmarks/gpu.sh\", carry=[\".whl\"], timeout_s=600)"
    exit 0
fi

# ---------------------------------------------------------------------------------------------------
START=$(date +%s)
BUDGET=${GPU_BUDGET_S:-540}
OUT="${OUT:-$REPO/runs/gpu}"
WORK="${GPU_WORK:-/tmp/fmlora-gpu}"
BACKBONE="${BACKBONE:-vit_base_patch16_224}"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bfloat16}"
SKIP=",${SKIP:-},"
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONDONTWRITEBYTECODE=1
left() { echo $((BUDGET - ($(date +%s) - START))); }
say() { echo "[gpu.sh +$(($(date +%s) - START))s] $*"; }

# Run "$@" in its own process group for at most $1 seconds; on timeout the whole group (the benchmark
# and the server it started) gets SIGTERM, then SIGKILL.
step() {
    local name=$1 limit=$2
    shift 2
    local budget
    budget=$(($(left) - 20))
    ((limit > budget)) && limit=$budget
    if ((limit < 30)); then
        say "SKIP $name: only $(left) s of the budget left"
        return 0
    fi
    say "START $name (limit ${limit}s): $*"
    setsid "$@" &
    local pid=$!
    (
        sleep "$limit"
        kill -TERM -- "-$pid" 2>/dev/null && echo "[gpu.sh] $name: time limit reached, stopped"
        sleep 10
        kill -KILL -- "-$pid" 2>/dev/null
    ) &
    local watchdog=$!
    wait "$pid"
    local rc=$?
    kill "$watchdog" 2>/dev/null
    wait "$watchdog" 2>/dev/null
    kill -KILL -- "-$pid" 2>/dev/null # leftovers (a server whose parent died)
    say "END $name rc=$rc"
    return 0
}

# --- the machine --------------------------------------------------------------------------------
say "recording the machine"
{
    echo "== date"; date -u
    echo "== nvidia-smi"; nvidia-smi 2>&1
    echo "== nvidia-smi -q (clocks, memory)"; nvidia-smi -q -d CLOCK,MEMORY 2>&1 | head -60
    echo "== cpu"; nproc --all; grep -m1 "model name" /proc/cpuinfo; free -g 2>&1
    echo "== disk"; df -h / /tmp 2>&1
    echo "== python"; command -v python3; python3 --version
    python3 -m pip list 2>/dev/null | grep -iE "^(torch|timm|numpy|pillow|safetensors|httpx|pydantic|fastapi|uvicorn|starlette|onnxruntime|typer|matplotlib|prometheus)" || true
} >"$OUT/env.txt" 2>&1
python3 - >>"$OUT/env.txt" 2>&1 <<'EOF'
import glob, os, time
print("== torch")
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("gpu", p.name, "memory GiB", round(p.total_memory / 2**30, 1), "SMs", p.multi_processor_count)
except Exception as exc:
    print("torch import failed:", exc)
print("== cached ViT weights and datasets")
homes = [os.path.expanduser("~"), "/root", "/home"]
hub_dirs = {os.environ.get("HF_HOME", ""), os.environ.get("HF_HUB_CACHE", ""), os.path.expanduser("~/.cache/huggingface")}
for d in sorted(x for x in hub_dirs if x):
    hub = os.path.join(d, "hub") if not d.endswith("hub") else d
    models = sorted(glob.glob(os.path.join(hub, "models--*")))
    print(f"{hub}: {len(models)} models cached")
    for m in models:
        if "vit" in m.lower() or "deit" in m.lower():
            print("   ", os.path.basename(m))
    ds = sorted(glob.glob(os.path.join(d, "datasets", "*")))
    print(f"{d}/datasets: {len(ds)} entries", [os.path.basename(x) for x in ds[:20]])
for d in ["~/.cache/torch/hub/checkpoints", "/data", "/datasets", "/mnt", "/opt/data", "~/data"]:
    p = os.path.expanduser(d)
    if os.path.isdir(p):
        entries = sorted(os.listdir(p))
        print(f"{p}: {len(entries)} entries", entries[:30])
    else:
        print(f"{p}: absent")
print("== timm pretrained weights reachable offline?")
try:
    import timm
    for name in ("vit_base_patch16_224.augreg_in21k", "vit_base_patch16_224.augreg2_in21k_ft_in1k", "vit_small_patch16_224.augreg_in21k"):
        t0 = time.time()
        try:
            timm.create_model(name, pretrained=True, num_classes=0)
            print(f"{name}: AVAILABLE ({time.time() - t0:.1f} s)")
        except Exception as exc:
            print(f"{name}: not cached ({type(exc).__name__}, {time.time() - t0:.1f} s)")
except Exception as exc:
    print("timm import failed:", exc)
EOF
say "machine recorded ($(wc -l <"$OUT/env.txt") lines in env.txt)"

# --- a venv: the image's packages underneath, the carried wheels and this checkout on top ---------
# `venv --without-pip` needs no ensurepip; the image's own pip installs the wheels (--target). A venv
# made from a venv's python does not see that venv's packages (torch): a .pth adds them after the new
# venv's own, so carried wheels take precedence. Without a venv module: a plain folder on PYTHONPATH.
VENV="$WORK/venv"
PARENT_SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
if python3 -m venv --without-pip "$VENV" 2>/dev/null; then
    PY="$VENV/bin/python"
    VSITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
    echo "$PARENT_SITE" >"$VSITE/_image_site.pth"
    export PYTHONPATH="$REPO:$REPO/clients"
else
    say "no venv module: carried wheels go to a folder on PYTHONPATH"
    PY=python3
    VSITE="$WORK/site"
    mkdir -p "$VSITE"
    export PYTHONPATH="$REPO:$REPO/clients:$VSITE"
fi
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$VSITE" "$WHEELS"/*.whl ||
        say "WARNING: carried wheels failed to install"
else
    say "WARNING: no carried wheels in .whl/ (run 'bash benchmarks/gpu.sh --prepare' here first)"
fi
# This checkout on the path, and its entry points (the `fmlora serve` plugin) registered, without a
# build backend (the image's setuptools may be too old for pyproject.toml): a .pth and dist-info stubs.
python3 - "$REPO" "$VSITE" <<'PYEOF' || say "WARNING: registering the checkout failed"
import sys, tomllib
from pathlib import Path
repo, site = Path(sys.argv[1]), Path(sys.argv[2])
(site / "_fmlora_checkout.pth").write_text(f"{repo}\n{repo / 'clients'}\n")
for pyproject in (repo / "pyproject.toml", repo / "clients" / "pyproject.toml"):
    project = tomllib.loads(pyproject.read_text())["project"]
    name, version = project["name"], project["version"]
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    groups = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
    for group, entries in groups.items():
        if entries:
            lines.append(f"[{group}]")
            lines += [f"{k} = {v}" for k, v in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    print("registered", name, version, sorted(groups))
PYEOF
"$PY" - <<'EOF' || { say "imports failed: stopping"; exit 1; }
import fastapi, pydantic, torch, timm, uvicorn
import fmlora, server.api.app
from importlib.metadata import entry_points
print("fmlora.commands entry points:", sorted(e.name for e in entry_points(group="fmlora.commands")))
print("imports ok: torch", torch.__version__, "timm", timm.__version__, "fastapi", fastapi.__version__,
      "pydantic", pydantic.__version__, "cuda", torch.cuda.is_available())
EOF
"$PY" -m pip list 2>/dev/null >"$WORK/pip-list.txt"

# --- the benchmarks -------------------------------------------------------------------------------
if [[ "$SKIP" != *,perf,* ]]; then
    step perf 200 "$PY" -m benchmarks.perf --out "$WORK/perf" --backbones "$BACKBONE" --batches 1,8,32 \
        --seconds "${PERF_SECONDS:-6}" --rounds 3 --device "$DEVICE" --dtype "$DTYPE"
fi
if [[ "$SKIP" != *,swap,* && -f benchmarks/swap.py ]]; then
    step swap 130 "$PY" -m benchmarks.swap --out "$WORK/swap" --backbone "$BACKBONE" --device "$DEVICE" \
        --dtype "$DTYPE" --swaps "${SWAPS:-100}"
fi
if [[ "$SKIP" != *,soak,* && -f benchmarks/soak.py ]]; then
    step soak 150 "$PY" -m benchmarks.soak --out "$WORK/soak" --backbone "$BACKBONE" --device "$DEVICE" \
        --dtype "$DTYPE" --swaps "${SOAK_SWAPS:-400}"
fi
# Accuracy on ImageNet-R (InfLoRA protocol, ViT-B/16 in21k) when the data and the backbone weights are
# on the machine: the training-free baselines beside FM-LoRA, one seed (DATA_ROOT holds imagenet-r/;
# pretrained weights come from the local hub cache, nothing is downloaded).
if [[ "$SKIP" != *,imagenet-r,* && -d "${DATA_ROOT:-/data}/imagenet-r" ]]; then
    step imagenet-r "${IMAGENET_R_BUDGET_S:-1800}" "$PY" -m fmlora.cli bench --benchmark imagenet-r \
        --data-root "${DATA_ROOT:-/data}" --tasks 10 --seeds 0 --device "$DEVICE" \
        --methods ncm,ranpac,fmlora --out "$WORK/imagenet-r"
else
    say "imagenet-r: no ${DATA_ROOT:-/data}/imagenet-r here, accuracy run skipped"
fi
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv >>"$OUT/env.txt" 2>&1

# --- results: at most 8 files come back -----------------------------------------------------------
say "packing results"
cp "$WORK/pip-list.txt" "$WORK/perf/" 2>/dev/null || true
tar czf "$OUT/results.tar.gz" -C "$WORK" --exclude venv --exclude '*.safetensors' --exclude 'home*' . 2>/dev/null
cp "$WORK/perf/perf.json" "$OUT/perf.json" 2>/dev/null
cp "$WORK"/perf/perf-*.png "$OUT/" 2>/dev/null
cp "$WORK/imagenet-r/summary.md" "$OUT/imagenet-r-summary.md" 2>/dev/null
for name in swap soak; do
    f=$(ls "$WORK/$name"/*.json 2>/dev/null | head -1)
    [[ -n "$f" ]] && cp "$f" "$OUT/$name-$(basename "$f")"
done
ls -la "$OUT"
say "done in $(($(date +%s) - START)) s"

# fmlora: one image for the API server (default command) and the training worker.
#
#   docker build -t fmlora:0.1.0 .                                     # CPU image (torch from PyPI)
#   docker build -t fmlora:0.1.0-cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .  # CPU-only torch: a much smaller image
#   docker build -t fmlora:0.1.0-cuda --build-arg TARGET=cuda .        # CUDA image (NVIDIA driver >= 580)
#
#   docker run --init -p 127.0.0.1:8000:8000 -e FMLORA_ADMIN_KEY=... -v fmlora-home:/data fmlora:0.1.0
#   docker run --init --no-healthcheck -v fmlora-home:/data fmlora:0.1.0 fmlora worker --home /data
#   docker run --init --gpus all -p 127.0.0.1:8000:8000 -e FMLORA_ADMIN_KEY=... -v fmlora-home:/data fmlora:0.1.0-cuda
#
# TARGET picks the base that the builder and the runtime share (the virtual environment is copied
# between them, so both must have the same interpreter at the same path):
#   cpu   python slim (Debian), Python 3.12
#   cuda  NVIDIA's CUDA 13.0 "base" image (Ubuntu 24.04, Python 3.12): the NVIDIA container settings and
#         the CUDA runtime. The torch wheel from PyPI is a CUDA 13.0 build that brings cuBLAS/cuDNN itself,
#         which is why the small "base" flavour is enough; the host needs a driver for CUDA 13 (>= 580).
# The PyPI torch wheel also runs on CPU, so the default image needs no extra package index;
# TORCH_INDEX_URL swaps in the CPU-only build of the same pinned torch/torchvision (several GB smaller).

ARG TARGET=cpu
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu

# ---------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS base-cuda
# Versions come from the pinned base image's Ubuntu release; its archive drops superseded package
# versions, so exact apt pins would break rebuilds without making them more reproducible.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------------
# base-${TARGET} names one of the two stages above, whose images are pinned; hadolint cannot resolve it.
# hadolint ignore=DL3006
FROM base-${TARGET} AS builder
ARG TORCH_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3 -m venv /opt/venv
WORKDIR /src

# 1. Dependencies only, read from the two pyproject files: this layer is rebuilt when they change, not
#    when the code does. Server extras for the server and worker, the SDK and its CLI for `fmlora demo`,
#    `fmlora predict` and `fmlora submit` inside the container.
COPY pyproject.toml ./
COPY clients/pyproject.toml clients/
RUN python3 -c "import tomllib; m = tomllib.load(open('pyproject.toml', 'rb'))['project']; c = tomllib.load(open('clients/pyproject.toml', 'rb'))['project']; print('\n'.join(m['dependencies'] + m['optional-dependencies']['server'] + c['dependencies'] + c['optional-dependencies']['cli']))" > /tmp/requirements.txt \
 && if [ -n "${TORCH_INDEX_URL}" ]; then \
      grep -E '^torch(vision)?==' /tmp/requirements.txt > /tmp/torch.txt \
      && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -r /tmp/torch.txt; \
    fi \
 && pip install --no-cache-dir -r /tmp/requirements.txt

# 2. The code (the offline glyph backbone ships inside fmlora/assets, so the image needs no download).
COPY README.md ./
COPY fmlora/ fmlora/
COPY server/ server/
COPY fmlora_demo/ fmlora_demo/
COPY clients/ clients/
RUN pip install --no-cache-dir --no-deps . ./clients \
 && pip check \
 && fmlora --help > /dev/null

# ---------------------------------------------------------------------------------------------------
# The same pinned base as the builder (see above), so the copied venv finds its interpreter.
# hadolint ignore=DL3006
FROM base-${TARGET} AS runtime
ARG TARGET
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="fmlora" \
      org.opencontainers.image.description="Serving system for continually learning image classifiers (FM-LoRA on frozen timm ViTs): API server and training worker" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="fmlora" \
      io.fmlora.target="${TARGET}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/fmlora \
    FMLORA_HOME=/data

# A fixed, non-root UID/GID (10001) so volume ownership is predictable; /data (the registry, FMLORA_HOME)
# and ~/.cache (timm/Hugging Face weights) belong to it. A new named volume copies this ownership.
RUN groupadd --gid 10001 fmlora \
 && useradd --uid 10001 --gid 10001 --no-log-init --create-home --home-dir /home/fmlora \
      --shell /usr/sbin/nologin fmlora \
 && install -d -o 10001 -g 10001 -m 0750 /data /home/fmlora/.cache

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/fmlora
VOLUME ["/data"]
EXPOSE 8000

# Ready only once the model is loaded and warmed up (GET /readyz answers 200); stdlib only, no curl.
# Proxies are bypassed so HTTP(S)_PROXY settings cannot turn the probe into a request elsewhere.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request as u; r = u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/readyz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

# Exec form: fmlora receives SIGTERM itself and drains in-flight requests. The training worker runs as
# its own container (compose.yaml), hence --no-worker.
CMD ["fmlora", "serve", "--host", "0.0.0.0", "--port", "8000", "--home", "/data", "--no-worker"]

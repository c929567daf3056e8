# ctrserve images (docs/operations.md "Running it in containers").
#
#   docker build --target serve   -t ctrserve-serve .    # the scorer: no torch
#   docker build --target trainer -t ctrserve-trainer .  # torch (CPU) + the train extra
#
# GPU scorer: onnxruntime-gpu on a CUDA runtime image with cuDNN. The onnxruntime-gpu release
# on PyPI now (1.31) links CUDA 13 and cuDNN 9, so BASE must provide those; for a CUDA 12 base,
# pin an onnxruntime-gpu release built for CUDA 12 instead (ORT="onnxruntime-gpu==X.Y.Z").
#
#   docker build --target serve \
#     --build-arg BASE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04 \
#     --build-arg ORT=onnxruntime-gpu -t ctrserve-serve-gpu .
#   docker run --gpus all -e CTRSERVE_PROVIDERS=cuda,cpu ... ctrserve-serve-gpu
#
# Layer order: pyproject.toml alone first and the dependencies installed from it (reused until
# pyproject.toml changes), then the source, installed without dependencies.

ARG BASE=python:3.11-slim

# ---- Python in a virtual environment, and the unprivileged user ------------------------------
FROM ${BASE} AS python
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# python:*-slim has Python 3.11; a CUDA runtime image has none, so it gets the distribution's
# (3.12 on Ubuntu 24.04; ctrserve needs >= 3.11). A venv either way, so pip never touches the
# system Python (Ubuntu 24.04 refuses that, PEP 668). /data holds the registry, the synthetic
# world and the event log (a volume in docker-compose.yml), owned by the user that runs.
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip \
    && groupadd --system --gid 10001 ctrserve \
    && useradd --system --uid 10001 --gid ctrserve --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin ctrserve \
    && mkdir -p /data \
    && chown ctrserve:ctrserve /data

# ---- the serving dependencies (the base install: onnxruntime, no torch) ---------------------
FROM python AS deps
# onnxruntime or onnxruntime-gpu (never both: they ship the same module)
ARG ORT=onnxruntime
WORKDIR /opt/ctrserve
COPY pyproject.toml deploy/docker/requirements.py deploy/docker/constraints.txt ./
# constraints.txt: the exact versions, so that two builds of one commit install the same
RUN python requirements.py --ort "$ORT" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt -c constraints.txt \
    && rm /tmp/requirements.txt

# ---- serve: the scorer ----------------------------------------------------------------------
FROM deps AS serve
COPY . .
# --no-deps: the dependencies are in place, and resolving them again would bring the CPU
# onnxruntime back beside onnxruntime-gpu
RUN pip install --no-deps . && rm -rf build
USER ctrserve
WORKDIR /data
# Every setting is a CTRSERVE_* variable (docs/operations.md "Settings"; REDIS_URL too). The scorer
# needs a bundle or an experiments file: CTRSERVE_BUNDLE or CTRSERVE_EXPERIMENTS_FILE.
ENV CTRSERVE_HOST=0.0.0.0 \
    CTRSERVE_PORT=8000 \
    CTRSERVE_REGISTRY=/data/registry
EXPOSE 8000
# Healthy = ready: models loaded and warmed, Redis answering (/readyz; /healthz is liveness
# only). The slim image has no curl, so Python's urllib asks; a non-2xx reply raises.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('CTRSERVE_PORT', '8000'), timeout=4)"]
# uvicorn drains in-flight requests and the batching queues on SIGTERM (docker stop)
STOPSIGNAL SIGTERM
CMD ["ctrserve", "serve"]

# ---- trainer: synth, train, export, retrain, simulate, load-features, ... --------------------
FROM deps AS trainer
# torch first, this exact version from the CPU index: an open range from PyPI would pull the
# CUDA build (gigabytes). For a GPU trainer pass the index of your CUDA version instead
# (--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cuXYZ) on a CUDA BASE.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0
# then the train extra (pyproject.toml's .[train]; its torch range admits the one installed)
RUN python requirements.py --extra train > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt -c constraints.txt \
    && rm /tmp/requirements.txt
COPY . .
RUN pip install --no-deps . && rm -rf build
USER ctrserve
WORKDIR /data
ENV CTRSERVE_REGISTRY=/data/registry
ENTRYPOINT ["ctrserve"]
CMD ["--help"]

# PRISM GPU worker: loads the model once from the mounted /models volume (weights are never baked
# into the image), then serves jobs from Redis. One container per GPU.
# BASE: a Debian or Ubuntu image; the default has CUDA. scripts/compose-check.sh builds a CPU
# variant on a debootstrap base, with torch's CPU wheel in docker/wheels.
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_BREAK_SYSTEM_PACKAGES=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY docker/wheels/ /tmp/wheels/
RUN pip install --no-cache-dir --find-links /tmp/wheels torch==2.13.0 && rm -rf /tmp/wheels
COPY pyproject.toml README.md /app/
COPY models /app/models
COPY phantoms /app/phantoms
COPY service /app/service
COPY worker /app/worker
COPY cli /app/cli
RUN pip install --no-cache-dir . && useradd --system --uid 10001 prism \
    && mkdir -p /cache/inversions /run/prism /data/blobs && chown -R prism /cache /run/prism /data/blobs
USER prism
ENV PRISM_DEVICE=cuda PRISM_MODEL_DIR=/models/sd15 PRISM_UNET_WEIGHTS=/models/prism_unet.safetensors \
    PRISM_CLIP_MODEL=/models/clip PRISM_INVERSION_CACHE_DIR=/cache/inversions \
    PRISM_WORKER_HEARTBEAT_FILE=/run/prism/heartbeat HOME=/tmp
VOLUME ["/models", "/cache"]
# healthy while the worker's heartbeats reach Redis (starting: the model loads first)
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s CMD ["prism", "worker-probe"]
CMD ["prism", "worker"]

# PRISM GPU worker: loads the model once from the mounted /models volume (weights are never baked
# into the image), then serves jobs from Redis. One container per GPU.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_BREAK_SYSTEM_PACKAGES=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0
COPY pyproject.toml README.md /app/
COPY models /app/models
COPY phantoms /app/phantoms
COPY service /app/service
COPY worker /app/worker
COPY cli /app/cli
RUN pip install --no-cache-dir . && useradd --system --uid 10001 prism
USER prism
ENV PRISM_DEVICE=cuda PRISM_MODEL_DIR=/models/sd15 PRISM_UNET_WEIGHTS=/models/prism_unet.safetensors \
    PRISM_CLIP_MODEL=/models/clip PRISM_INVERSION_CACHE_DIR=/cache/inversions
VOLUME ["/models", "/cache"]
CMD ["prism", "worker"]

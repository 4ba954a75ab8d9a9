# PRISM API (and the webhook sender): validates requests and enqueues jobs. Slim, no torch.
# BASE: any image with Python 3.11 and pip (scripts/compose-check.sh builds one with debootstrap).
ARG BASE=python:3.11-slim
FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORKDIR /app
COPY docker/requirements-api.txt /app/docker/requirements-api.txt
RUN pip install --no-cache-dir -r docker/requirements-api.txt
COPY pyproject.toml README.md /app/
COPY models /app/models
COPY phantoms /app/phantoms
COPY service /app/service
COPY worker /app/worker
COPY cli /app/cli
RUN pip install --no-cache-dir --no-deps . \
    && useradd --system --uid 10001 prism \
    && mkdir -p /data/blobs && chown prism /data/blobs
USER prism
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["prism", "serve", "--host", "0.0.0.0", "--port", "8000"]

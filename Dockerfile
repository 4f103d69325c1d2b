# kvtier image for the Helm chart's Ray head and GPU worker pods.
#   docker build -t ghcr.io/kvtier/kvtier:0.1.0 .
# CUDA runtime base; torch comes from the PyTorch index for that CUDA (TORCH_SPEC / TORCH_INDEX), the project
# and its pinned Ray (2.60.0, which the chart's ray.version must equal) from PyPI.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_SPEC="torch==2.9.1"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/kvtier \
    PATH=/opt/kvtier/bin:$PATH

# bash and wget: KubeRay runs the container command through bash and probes Ray with wget.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv bash wget ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/kvtier && pip install --upgrade pip \
    && pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX}"

WORKDIR /opt/kvtier/src
COPY pyproject.toml README.md ./
COPY cluster cluster
COPY workers workers
COPY router router
COPY kvstore kvstore
COPY protos protos
RUN pip install ".[gpu]"

# Non-root: uid 1000 in group users (100), as the chart's podSecurityContext expects.
RUN useradd --uid 1000 --gid 100 --create-home --home-dir /home/kvtier kvtier
USER 1000:100
WORKDIR /home/kvtier
ENV HOME=/home/kvtier KVTIER_CACHE_DIR=/home/kvtier/.cache/kvtier

EXPOSE 50051 50052 9400
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["kvtier", "serve", "--config", "/etc/kvtier/config/config.yaml"]

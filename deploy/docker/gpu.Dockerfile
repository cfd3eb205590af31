# syntax=docker/dockerfile:1
# GPU image: vLLM's official OpenAI server image + this project.
#
#   docker build -f deploy/docker/gpu.Dockerfile -t vllm-safety-patch:gpu .   # repo root
#   docker run --gpus all -p 8000:8000 -e VSP_ADMIN_TOKEN=... vllm-safety-patch:gpu
#
# Build args as in cpu.Dockerfile (PREPARE_MODEL); VLLM_IMAGE picks the base, which must
# carry vLLM 0.32 (the version the plugin is built and tested against).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ARG PREPARE_MODEL=1

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VSP_HOME=/opt/vsp/home \
    VSP_MODEL=/opt/vsp/home/models/qwen2.5-coder-0.5b-instruct \
    VSP_DELTA_DIR=/opt/vsp/deltas/qwen2.5-coder-0.5b-instruct \
    VSP_DELTAS=all \
    VSP_PORT=8000 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/vsp

# The project without the `gpu` extra: the image's own vLLM and torch stay as they are.
COPY pyproject.toml README.md /opt/vsp/src/
COPY vllm_safety_patch /opt/vsp/src/vllm_safety_patch
RUN python3 -m pip install /opt/vsp/src \
 && python3 -c "import vllm, vllm_safety_patch; print('vllm', vllm.__version__)" \
 && rm -rf /opt/vsp/src

COPY deltas /opt/vsp/deltas
RUN if [ "$PREPARE_MODEL" = 1 ]; then vsp model prepare && rm -rf "$VSP_HOME/downloads"; fi
COPY deploy/docker/entrypoint.sh deploy/docker/healthcheck.py /opt/vsp/bin/

RUN useradd --system --uid 10001 --user-group --home-dir /home/vsp --create-home vsp
USER 10001:10001
WORKDIR /home/vsp

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
  CMD ["python3", "/opt/vsp/bin/healthcheck.py"]
# Replaces the base image's `vllm serve` entry point: vsp serve adds the loader and routes.
ENTRYPOINT ["/opt/vsp/bin/entrypoint.sh"]
CMD []

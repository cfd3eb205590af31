"""Where things live on disk. One place, so every command agrees."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "qwen2.5-coder-0.5b-instruct"


def vsp_home() -> Path:
    """Cache root: ``$VSP_HOME`` or ``~/.cache/vllm-safety-patch``."""
    env = os.environ.get("VSP_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vllm-safety-patch"


def default_model_dir() -> Path:
    """Where ``vsp model prepare`` writes the safetensors checkpoint of the default model."""
    return vsp_home() / "models" / DEFAULT_MODEL_NAME


def repo_deltas_dir() -> Path:
    """Shipped deltas (a source checkout's ``deltas/`` folder)."""
    return Path(__file__).resolve().parent.parent / "deltas"

"""Where things live on disk: kept for the modules that import it from here; the paths and
every ``VSP_*`` variable are defined in :mod:`vllm_safety_patch.settings`."""

from __future__ import annotations

from vllm_safety_patch.settings import (
    DEFAULT_MODEL_NAME,
    default_model_dir,
    delta_dir_for,
    repo_deltas_dir,
    vsp_home,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "default_model_dir",
    "delta_dir_for",
    "repo_deltas_dir",
    "vsp_home",
]

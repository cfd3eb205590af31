"""Read an HF safetensors checkpoint folder tensor by tensor, without loading it whole."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vllm_safety_patch.errors import DeltaMismatchError


class Checkpoint:
    """A folder with ``config.json`` and one or more ``*.safetensors`` files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise DeltaMismatchError(
                f"'{self.path}' is not a model checkpoint (no config.json)",
                "pass the folder of an HF safetensors checkpoint or a catalogue name "
                "('vsp model list'), or run 'vsp model prepare' for the default model",
            )
        try:
            self.config: dict = json.loads(config_file.read_text())
        except (ValueError, RecursionError, UnicodeDecodeError):
            raise DeltaMismatchError(
                f"{config_file} is not valid JSON",
                "repair or re-create the checkpoint (for the default model: "
                "'vsp model prepare --force')",
            ) from None
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise DeltaMismatchError(
                f"'{self.path}' holds no *.safetensors weights",
                "convert the checkpoint to safetensors (vsp reads no pickle files)",
            )
        self._file_of: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}
        for file in files:
            try:
                with safe_open(file, framework="pt") as handle:
                    for name in handle.keys():
                        tensor_slice = handle.get_slice(name)
                        self._file_of[name] = file
                        self._shape[name] = tuple(tensor_slice.get_shape())
                        self._dtype[name] = tensor_slice.get_dtype()
            except (SafetensorError, OSError) as error:
                raise DeltaMismatchError(
                    f"{file} is not a readable safetensors file ({error})",
                    "repair or re-create the checkpoint (for the default model: "
                    "'vsp model prepare --force')",
                ) from None

    def tensor_names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def dtype(self, name: str) -> str:
        """The safetensors dtype string as stored, e.g. ``BF16``."""
        return self._dtype[name]

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self._file_of[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in names}

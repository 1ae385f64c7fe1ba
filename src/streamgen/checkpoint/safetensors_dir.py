"""Checkpoint tensors from safetensors files (memory-mapped; never pickle)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from streamgen.errors import MissingTensorError, ModelLoadError


class CheckpointTensors:
    """Lazy name -> tensor access over one or more ``*.safetensors`` files.

    >>> with CheckpointTensors.open(path) as tensors:  # doctest: +SKIP
    ...     w = tensors.get("model.norm.weight")
    """

    def __init__(self, files: dict[str, Any], stack: ExitStack) -> None:
        self._files = files  # tensor name -> open safe_open handle
        self._stack = stack

    @classmethod
    def open(cls, checkpoint_dir: Path) -> CheckpointTensors:
        paths = _safetensors_files(checkpoint_dir)
        stack = ExitStack()
        files: dict[str, Any] = {}
        try:
            for path in paths:
                handle = stack.enter_context(safe_open(str(path), framework="pt"))
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                    files[name] = handle
        except Exception as exc:
            stack.close()
            msg = f"cannot read safetensors file in {checkpoint_dir}: {exc}"
            raise ModelLoadError(msg) from exc
        return cls(files, stack)

    def __enter__(self) -> CheckpointTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def names(self) -> Iterator[str]:
        return iter(self._files)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name``; :class:`MissingTensorError` naming it if absent."""
        handle = self._files.get(name)
        if handle is None:
            raise MissingTensorError(f"checkpoint is missing tensor {name!r}")
        tensor: torch.Tensor = handle.get_tensor(name)
        return tensor if dtype is None else tensor.to(dtype)


def _safetensors_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [checkpoint_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if files:
        return files
    if any(checkpoint_dir.glob("*.bin")) or any(checkpoint_dir.glob("*.pt")):
        raise ModelLoadError(
            f"{checkpoint_dir} holds only pickle weights (*.bin/*.pt); streamgen loads "
            "safetensors only (convert with transformers' save_pretrained(safe_serialization=True))"
        )
    raise ModelLoadError(f"no *.safetensors weights found in {checkpoint_dir}")

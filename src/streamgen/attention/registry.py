"""Backends registered by name and imported lazily, so `import streamgen`
never pulls in GPU-only modules."""

from __future__ import annotations

import importlib

import torch

from streamgen.attention.backend import AttentionBackend

# name -> "module:Class"
_BACKENDS: dict[str, str] = {
    "torch": "streamgen.attention.torch_ref:TorchReferenceBackend",
    "triton": "streamgen.attention.triton_backend:TritonAttentionBackend",
    "flash_attn": "streamgen.attention.flash_attn_backend:FlashAttnBackend",
    "flex": "streamgen.attention.flex:FlexAttentionBackend",
    "native": "streamgen.attention.native:NativeAttentionBackend",
}


def available_backends() -> tuple[str, ...]:
    """Names accepted by :func:`create_backend`."""
    return tuple(_BACKENDS)


def create_backend(name: str = "torch") -> AttentionBackend:
    """Instantiate the backend registered under ``name``.

    >>> create_backend("torch").name
    'torch'
    """
    try:
        target = _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {available_backends()}"
        ) from None
    module_name, class_name = target.split(":")
    backend_cls = getattr(importlib.import_module(module_name), class_name)
    backend: AttentionBackend = backend_cls()
    return backend


def default_backend_name(device: torch.device | str) -> str:
    """The fastest backend that runs on ``device``.

    CUDA: ``flash_attn`` when the package imports, else ``triton`` when it
    imports, else ``torch``. Any other device: ``torch``.

    >>> default_backend_name("cpu")
    'torch'
    """
    if torch.device(device).type != "cuda":
        return "torch"
    for name, module in (("flash_attn", "flash_attn"), ("triton", "triton")):
        if _can_import(module):
            return name
    return "torch"


def _can_import(module: str) -> bool:
    try:
        importlib.import_module(module)
    except (ImportError, OSError):  # flash_attn built for another torch fails with OSError
        return False
    return True

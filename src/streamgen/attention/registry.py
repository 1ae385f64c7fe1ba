"""Backends registered by name and imported lazily, so `import streamgen`
never pulls in GPU-only modules."""

from __future__ import annotations

import importlib

from streamgen.attention.backend import AttentionBackend

# name -> "module:Class"
_BACKENDS: dict[str, str] = {
    "torch": "streamgen.attention.torch_ref:TorchReferenceBackend",
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

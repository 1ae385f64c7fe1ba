"""Attention backends behind one interface; chosen at start-up by name."""

from streamgen.attention.backend import AttentionBackend, AttentionMetadata
from streamgen.attention.registry import available_backends, create_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "available_backends", "create_backend"]

"""Kernel tests run natively on a GPU, else under the Triton interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` runs (triton decides
at decoration time), so it is set here, before the test modules import
``streamgen.kernels``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """CUDA when present (compiled kernels), else the CPU (interpreted kernels)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

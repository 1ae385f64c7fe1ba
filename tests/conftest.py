from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(2)

# Triton kernels run on the CPU through the interpreter; the variable must be
# set before any kernel module is imported (GPU machines run them natively).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model (SmolLM2-135M-Instruct), built into the cache once."""
    from streamgen.models import default_model_path

    return default_model_path(progress=True)

# Shared torch-free fakes (property_tests/fake_runner.py) for the scheduler tests.
sys.path.insert(0, str(Path(__file__).parents[1] / "property_tests"))

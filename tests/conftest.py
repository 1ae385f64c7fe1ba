from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model (SmolLM2-135M-Instruct), built into the cache once."""
    from streamgen.models import default_model_path

    return default_model_path(progress=True)

# Shared torch-free fakes (property_tests/fake_runner.py) for the scheduler tests.
sys.path.insert(0, str(Path(__file__).parents[1] / "property_tests"))

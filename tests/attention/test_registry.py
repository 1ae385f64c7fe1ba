"""Backend registry: names, lazy construction, and the default backend per device."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # create_backend("triton") imports the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

from streamgen.attention import registry
from streamgen.attention.registry import (
    available_backends,
    create_backend,
    default_backend_name,
)


def test_registers_torch_triton_and_flash_attn() -> None:
    assert {"torch", "triton", "flash_attn"} <= set(available_backends())


def test_creates_backends_by_name() -> None:
    assert create_backend("torch").name == "torch"
    pytest.importorskip("triton")
    assert create_backend("triton").name == "triton"


def test_unknown_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown attention backend"):
        create_backend("nope")


def test_cpu_always_defaults_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_can_import", lambda module: True)
    assert default_backend_name("cpu") == "torch"


@pytest.mark.parametrize(
    ("importable", "expected"),
    [
        ({"flash_attn", "triton"}, "flash_attn"),
        ({"flash_attn"}, "flash_attn"),
        ({"triton"}, "triton"),
        (set(), "torch"),
    ],
)
def test_cuda_prefers_flash_attn_then_triton(
    monkeypatch: pytest.MonkeyPatch, importable: set[str], expected: str
) -> None:
    monkeypatch.setattr(registry, "_can_import", lambda module: module in importable)
    assert default_backend_name("cuda") == expected
    assert default_backend_name("cuda:1") == expected


def test_can_import_reports_real_modules() -> None:
    assert registry._can_import("math")
    assert not registry._can_import("streamgen_no_such_module")

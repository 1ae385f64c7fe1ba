"""FlashAttnBackend: a typed error where it cannot run; on a GPU with flash-attn,
the same answers as TorchReferenceBackend (paged and gathered block sizes)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from streamgen.errors import BackendUnavailableError, ConfigError

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


@pytest.mark.skipif(HAS_FLASH_ATTN and torch.cuda.is_available(), reason="flash-attn can run here")
def test_construction_without_flash_attn_or_gpu_raises_typed_error() -> None:
    from streamgen.attention.flash_attn_backend import FlashAttnBackend

    with pytest.raises(BackendUnavailableError, match="flash") as caught:
        FlashAttnBackend()
    assert isinstance(caught.value, ConfigError)


@pytest.mark.skipif(HAS_FLASH_ATTN and torch.cuda.is_available(), reason="flash-attn can run here")
def test_registry_reports_the_same_typed_error() -> None:
    from streamgen.attention.registry import create_backend

    with pytest.raises(BackendUnavailableError):
        create_backend("flash_attn")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="needs flash-attn")
@pytest.mark.parametrize("block_size", [16, 256], ids=["gathered", "paged"])
@pytest.mark.parametrize("all_decodes", [False, True], ids=["mixed", "decodes"])
@pytest.mark.parametrize("sliding_window", [None, 100])
@pytest.mark.parametrize("softcap", [None, 2.0])  # Gemma 2's soft-capped scores
def test_matches_torch_backend_on_gpu(
    block_size: int, all_decodes: bool, sliding_window: int | None, softcap: float | None
) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))
    from paged_kv_data import make_cache, make_metadata, scattered_block_tables

    from streamgen.attention.flash_attn_backend import FlashAttnBackend
    from streamgen.attention.torch_ref import TorchReferenceBackend

    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(block_size)
    seq_lens = [1, 15, 16, 17, 300, 700, 1000]
    query_lens = [1] * len(seq_lens) if all_decodes else [1, 15, 1, 2, 120, 700, 1]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    cache = make_cache(num_blocks, block_size, 2, 128, torch.bfloat16, device, generator)
    tables = scattered_block_tables(seq_lens, block_size, num_blocks, generator).to(device)
    metadata = make_metadata(
        tables, seq_lens, query_lens, block_size, sliding_window=sliding_window
    )
    metadata = dataclasses.replace(metadata, logit_softcap=softcap)
    query = torch.randn(metadata.num_tokens, 8, 128, generator=generator)
    query = query.to(torch.bfloat16).to(device)
    outputs = []
    for backend in (FlashAttnBackend(), TorchReferenceBackend()):
        backend.prepare(metadata)
        outputs.append(backend.attend(query, cache.k_cache, cache.v_cache, metadata, 0.088))
    assert (outputs[0].float() - outputs[1].float()).abs().max().item() <= 2e-2

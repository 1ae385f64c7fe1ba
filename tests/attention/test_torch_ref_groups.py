"""The torch reference backend's grouping: a step's answer does not depend on which
sequences share it (decodes, short chunks and trees, long prefill chunks)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from streamgen.attention import torch_ref
from streamgen.attention.torch_ref import TorchReferenceBackend

sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))

from paged_kv_data import make_cache, make_metadata, random_tree_mask, scattered_block_tables

BLOCK_SIZE, NUM_BLOCKS, HEADS, KV_HEADS, DIM = 16, 64, 4, 2, 16


def test_mixed_step_equals_each_sequence_alone() -> None:
    """A decode, a 6-token tree, a 9-token causal chunk and a 40-token prefill chunk in
    one step (three groups, each padded to its own longest) equal four one-sequence steps."""
    g = torch.Generator().manual_seed(0)
    cache = make_cache(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, DIM, torch.float32,
                       torch.device("cpu"), g)
    seq_lens, query_lens = [33, 47, 20, 70], [1, 6, 9, 40]
    tables = scattered_block_tables(seq_lens, BLOCK_SIZE, NUM_BLOCKS, g)
    tree = random_tree_mask(query_lens, {1}, g)
    metadata = make_metadata(tables, seq_lens, query_lens, BLOCK_SIZE, tree_mask=tree)
    query = torch.randn(sum(query_lens), HEADS, DIM, generator=g)
    backend = TorchReferenceBackend()
    backend.prepare(metadata)
    assert len(backend._plans) == 3  # decodes, short chunks, long chunks
    assert 40 > torch_ref.SHORT_CHUNK >= 9
    out = backend.attend(query, cache.k_cache, cache.v_cache, metadata, DIM**-0.5)
    row = 0
    for seq, (seq_len, q_len) in enumerate(zip(seq_lens, query_lens, strict=True)):
        own_tree = tree[row : row + q_len, :q_len] if seq == 1 else None
        alone = make_metadata(tables[seq : seq + 1], [seq_len], [q_len], BLOCK_SIZE,
                              tree_mask=own_tree)
        expected = TorchReferenceBackend().attend(
            query[row : row + q_len], cache.k_cache, cache.v_cache, alone, DIM**-0.5
        )
        assert (out[row : row + q_len] - expected).abs().max() < 1e-5, seq
        row += q_len

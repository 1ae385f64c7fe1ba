"""The attention-backend interface and the per-step metadata it reads.

Paged KV layout (one pair of tensors per layer)::

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]

    block_table[seq] = [7, 2, 9]      logical block i of the sequence lives in
                                      physical block block_table[seq][i]
    token at position p  ->  slot = block_table[seq][p // block_size] * block_size
                                    + p % block_size

A step's batch is flat: the new tokens of every sequence (a prefill chunk or
one decode token) are concatenated. Sequence ``b`` owns query rows
``query_start_loc[b]:query_start_loc[b+1]``; its context after this step is
``seq_lens[b]`` tokens, so its first new token sits at position
``seq_lens[b] - query_lens[b]`` (bottom-right causal alignment).

Token trees (speculative verification): a sequence's new tokens may be the
nodes of a draft tree instead of a causal run. They still occupy the slots
``seq_lens[b] - query_lens[b] ..`` in order, but ``tree_mask`` says which of
the sequence's own new tokens each new token sees (itself and its
ancestors); the cached prefix is always visible. Rotary positions come from
the model's ``positions`` input (prefix length + depth), not from the slot.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Per-step tensors shared by every layer. Built once by the runner."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot each new token writes to
    query_start_loc: torch.Tensor  # [num_seqs + 1] int64, cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int64, context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int64, padded with 0
    # The same facts as plain ints, so backends can plan without host syncs.
    query_lens_list: tuple[int, ...]
    seq_lens_list: tuple[int, ...]
    block_size: int
    sliding_window: int | None = None
    # Attention logit soft-capping (Gemma 2): scores = cap * tanh(scores / cap) before the
    # mask and softmax. Served by the torch reference, the native and Triton kernels and
    # flash-attn (its softcap); flex defers to the reference.
    logit_softcap: float | None = None
    # None: every chunk is causal. Otherwise row t (a new token of sequence b)
    # column j says whether t sees new token j of the same sequence (j indexes
    # b's own chunk; columns >= query_lens[b] are False). Causal chunks have a
    # lower-triangular block here. With sliding_window (backends whose windowed_trees is
    # True), a tree row's window counts back from its position, prefix + its depth.
    tree_mask: torch.Tensor | None = None  # [num_tokens, max_query_len] bool

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])


class AttentionBackend(ABC):
    """Computes paged attention for one layer of one step.

    Implementations must treat ``metadata`` as read-only and may cache
    per-step plans keyed on it (``prepare`` is called once per step, before
    the first layer).
    """

    name: str = "abstract"
    # True when the all-decode path can be captured in a CUDA graph: ``prepare``
    # does host-only planning (no tensors built, no syncs), ``write_kv`` and
    # ``attend`` read only the metadata's device tensors, and ``seq_lens_list``
    # is used only as an upper bound (a graph is planned for ``max_model_len``;
    # the kernels find each row's real length in ``seq_lens``).
    supports_cuda_graphs: bool = False
    # True when a tree mask combines with a sliding window (the window counted from each
    # node's depth, as a decode of its token would see it); speculation on a windowed
    # model drafts chains on the others (spec/factory.py).
    windowed_trees: bool = False

    def prepare(self, metadata: AttentionMetadata) -> None:  # noqa: B027 - optional hook
        """Called once per step before the first layer; build shared plans here."""

    def write_kv(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> None:
        """Store the step's new K/V at their slots (reshape-and-cache)."""
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(
            0, metadata.slot_mapping, key.to(k_cache.dtype)
        )
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(
            0, metadata.slot_mapping, value.to(v_cache.dtype)
        )

    @abstractmethod
    def attend(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Attention of every new token over its sequence's cached context
        (the new tokens' K/V are already written)."""

"""What crosses the scheduler/runner line: plain data, no tensors (no torch import).

The scheduler decides, for each request in a step, which new tokens run and
where their K/V live; the runner turns that into tensors. A request catching
up on its prompt (prefill, possibly in chunks) and a request decoding one
token look the same here: ``token_ids`` are the tokens not yet in the cache,
``start_pos`` is how many tokens already are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from streamgen.sampling_params import SamplingParams
from streamgen.spec.tree import DraftTree


@dataclass(frozen=True, slots=True)
class SamplingRequest:
    """What the sampler needs to know about the request behind one logits row.

    Attributes:
        params: The request's sampling parameters.
        prompt_token_ids: The prompt (the repetition penalty looks at it).
        output_token_ids: Tokens generated before this step.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # Structured outputs: the tokens the constraint allows at this row, an int32 bitmask
    # (numpy, ``[ceil(vocab / 32)]``: token t is bit t % 32 of word t // 32); None: all.
    allowed: Any = None


@dataclass(frozen=True, slots=True)
class SequenceChunk:
    """One request's share of a step.

    ``block_table`` must cover positions ``0 .. start_pos + len(token_ids) - 1``.
    ``sampling`` is None for a prefill chunk that does not reach the end of
    the prompt (nothing to sample yet).

    With a ``tree`` (speculative verification) the chunk is the root (the
    request's last token) followed by ``tree.tokens``; they fill the slots
    from ``start_pos`` on in that order, row ``i`` sits at position
    ``start_pos + tree.position_offsets()[i]``, and every row is verified.
    """

    request_id: str
    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]
    sampling: SamplingRequest | None = None
    tree: DraftTree | None = None
    # Prompt logprobs: the top-k count and the prompt token each row predicts (row i ->
    # prompt[start_pos + i + 1]; the prompt's last row predicts a sampled token, no entry).
    prompt_logprobs: int | None = None
    prompt_targets: Sequence[int] = ()
    # Structured outputs with a draft tree: each node's allowed-token bitmask (the
    # root's is ``sampling.allowed``), in node order.
    tree_allowed: Sequence[Any] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        """Context length after this step."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True, slots=True)
class ModelBatch:
    """All the work of one step."""

    chunks: Sequence[SequenceChunk]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    """Emitted tokens, one entry per token, grouped by request in batch order.

    A chunk that samples emits one token; a verified tree emits its accepted
    draft tokens and one more, so its request id repeats. ``logprobs`` and
    ``top_logprobs`` are per token, aligned with ``token_ids``.
    """

    request_ids: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # Per request: (position, logprob, top (token, logprob) pairs) of prompt tokens.
    prompt_logprobs: dict[str, list[tuple[int, float, tuple[tuple[int, float], ...]]]] = field(
        default_factory=dict
    )

"""The drafter interface: propose a token tree per request, within a budget.

The engine calls :meth:`Drafter.propose` once per step, after the scheduler
has reserved each speculating request's KV slots (the root plus
``max_nodes`` tree slots) and before the target model verifies. A drafter
that runs a model writes its own K/V for the tree at exactly those slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from streamgen.spec.tree import DraftTree


@dataclass(frozen=True, slots=True)
class DraftInput:
    """One request's share of a drafting call.

    Attributes:
        request_id: The request.
        prompt_token_ids: Its prompt.
        output_token_ids: Its output so far; the last token of
            ``prompt + output`` is the tree's root (not yet in the KV cache).
        num_computed_tokens: Tokens whose target K/V is cached (all but the root).
        block_table: The request's blocks, covering the root and ``max_nodes`` more slots.
        max_nodes: Node budget of the tree.
        max_depth: Depth budget of the tree.
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    num_computed_tokens: int
    block_table: Sequence[int]
    max_nodes: int
    max_depth: int

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, index: int) -> int:
        num_prompt = len(self.prompt_token_ids)
        if index < num_prompt:
            return self.prompt_token_ids[index]
        return self.output_token_ids[index - num_prompt]


class Drafter(Protocol):
    """Proposes draft trees. Stateful drafters key their state by request id."""

    name: str

    def propose(self, inputs: Sequence[DraftInput]) -> list[DraftTree]:
        """One tree per input (possibly empty), within its budgets."""
        ...

    def reset(self, request_id: str) -> None:
        """The request's KV cache was dropped or moved (preemption): rebuild any state."""
        ...

    def forget(self, request_id: str) -> None:
        """The request finished: drop its state."""
        ...

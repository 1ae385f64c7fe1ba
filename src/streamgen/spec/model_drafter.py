"""Model drafters: a small draft model, or the target's own first layers.

Both grow a top-k token tree level by level with a model, batched over the
requests of the step, and write their K/V through the *target's* block
tables, so block allocation, trimming and preemption need no bookkeeping of
their own:

* ``draft_model``: a separate, smaller model with its own paged cache (same
  number of blocks and block size as the target's, its own layer shapes).
  It remembers per request how many tokens its cache holds and catches up
  on the rest (accepted drafts, the bonus token, or the whole prompt for a
  new or preempted request) in the first forward of each step.
* ``self``: the target's first ``k`` layers + final norm + LM head over the
  target's own cache of those layers. The target has computed every token
  but the root, so only the root is fed; the draft writes only slots the
  target's verification overwrites anyway (the root and the tree).

One step of drafting, for depth ``D``::

    forward 1: catch-up chunk ending with the root       -> root logits -> level 1
    forward d: root + the tree so far (tree mask)        -> level d-1 logits -> level d

Children are the ``branching`` most likely tokens of each frontier node;
among all candidates of a level the most likely paths (by cumulative draft
log-probability) are kept until the node budget is spent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from streamgen.attention.backend import AttentionBackend
from streamgen.model.llama import LlamaModel
from streamgen.runner.batch import ModelBatch, SequenceChunk
from streamgen.runner.input_prep import prepare_inputs
from streamgen.spec.drafter import DraftInput
from streamgen.spec.tree import ROOT, DraftTree

KVCaches = Sequence[tuple[torch.Tensor, torch.Tensor]]


@dataclass(slots=True)
class _Growing:
    """A tree under construction for one request."""

    inp: DraftInput
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # cumulative draft logprob per node
    frontier: list[int] = field(default_factory=list)  # nodes of the newest level

    def tree(self) -> DraftTree:
        return DraftTree(tuple(self.tokens), tuple(self.parents))


class ModelDrafter:
    """Drafts top-k trees with a model over paged caches addressed by the target's tables.

    Args:
        name: ``"draft_model"`` or ``"self"``.
        model: The draft model (for ``"self"``, the target model itself).
        caches: The draft's per-layer ``(k, v)`` caches (for ``"self"``, the
            target's first ``num_layers``).
        backend: An attention backend instance for the draft's forwards.
        block_size: Tokens per block (the target's).
        num_layers: Layers to run (``None``: all of ``model``).
        branching: Children per frontier node.
        shares_target_cache: The caches are the target's (``"self"``): the
            draft never recomputes tokens the target has computed.
    """

    def __init__(
        self,
        name: str,
        model: LlamaModel,
        caches: KVCaches,
        backend: AttentionBackend,
        block_size: int,
        *,
        num_layers: int | None = None,
        branching: int = 2,
        shares_target_cache: bool = False,
    ) -> None:
        self.name = name
        self.model = model
        self.caches = list(caches)
        self.backend = backend
        self.block_size = block_size
        self.num_layers = num_layers
        self.branching = branching
        self.shares_target_cache = shares_target_cache
        self._computed: dict[str, int] = {}  # tokens whose draft K/V is cached

    @property
    def num_blocks(self) -> int:
        return int(self.caches[0][0].shape[0])

    def reset(self, request_id: str) -> None:
        self._computed.pop(request_id, None)

    def forget(self, request_id: str) -> None:
        self._computed.pop(request_id, None)

    @torch.inference_mode()
    def propose(self, inputs: Sequence[DraftInput]) -> list[DraftTree]:
        growing = [_Growing(inp) for inp in inputs if inp.max_nodes > 0 and inp.max_depth > 0]
        if growing:
            self._first_level(growing)
            for depth in range(2, max(g.inp.max_depth for g in growing) + 1):
                active = [
                    g for g in growing
                    if g.frontier and len(g.tokens) < g.inp.max_nodes and depth <= g.inp.max_depth
                ]
                if not active:
                    break
                self._next_level(active)
        trees = {id(g.inp): g.tree() for g in growing}
        return [trees.get(id(inp), DraftTree()) for inp in inputs]

    # ----- levels ---------------------------------------------------------------------

    def _first_level(self, growing: list[_Growing]) -> None:
        """Catch up on the context and expand the root."""
        chunks = []
        for g in growing:
            inp = g.inp
            start = self._start(inp)
            tokens = [inp.token_at(i) for i in range(start, inp.num_tokens)]
            chunks.append(SequenceChunk(inp.request_id, tokens, start, inp.block_table))
        logprobs = self._forward_last_rows(chunks, [1] * len(chunks))
        for g, rows in zip(growing, logprobs, strict=True):
            self._computed[g.inp.request_id] = g.inp.num_tokens
            self._expand(g, [ROOT], rows, [0.0])

    def _next_level(self, active: list[_Growing]) -> None:
        """Feed the root and the tree so far; expand the newest level."""
        chunks = []
        counts = []
        for g in active:
            inp = g.inp
            root = inp.token_at(inp.num_tokens - 1)
            chunks.append(SequenceChunk(
                inp.request_id, [root, *g.tokens], inp.num_tokens - 1, inp.block_table,
                tree=g.tree(),
            ))
            counts.append(len(g.frontier))
        logprobs = self._forward_last_rows(chunks, counts)
        for g, rows in zip(active, logprobs, strict=True):
            frontier = g.frontier
            self._expand(g, frontier, rows, [g.scores[n] for n in frontier])

    def _expand(
        self,
        g: _Growing,
        parents: list[int],
        logprobs: torch.Tensor,  # [len(parents), vocab] draft logprobs after each parent
        parent_scores: list[float],
    ) -> None:
        budget = g.inp.max_nodes - len(g.tokens)
        k = min(self.branching, budget)
        if k <= 0:
            g.frontier = []
            return
        values, ids = logprobs.topk(k, dim=-1)  # [len(parents), k]
        candidates = [
            (parent_scores[i] + v, parents[i], t)
            for i, (vs, ts) in enumerate(zip(values.tolist(), ids.tolist(), strict=True))
            for v, t in zip(vs, ts, strict=True)
        ]
        candidates.sort(key=lambda c: -c[0])
        g.frontier = []
        for score, parent, token in candidates[:budget]:
            g.frontier.append(len(g.tokens))
            g.tokens.append(token)
            g.parents.append(parent)
            g.scores.append(score)

    # ----- model -----------------------------------------------------------------------

    def _start(self, inp: DraftInput) -> int:
        """First position the draft must compute for this request."""
        if self.shares_target_cache:
            return inp.num_computed_tokens  # the target's K/V of these layers is the draft's
        return min(self._computed.get(inp.request_id, 0), inp.num_tokens - 1)

    def _forward_last_rows(
        self, chunks: list[SequenceChunk], counts: list[int]
    ) -> list[torch.Tensor]:
        """Run the draft over ``chunks``; per chunk, log-softmax of its last ``counts`` rows."""
        device = self.caches[0][0].device
        spec = self.model.spec
        inputs = prepare_inputs(
            ModelBatch(chunks), self.block_size, self.num_blocks, spec.vocab_size, device,
            spec.sliding_window,  # the draft's own window, as the target's runner passes its
        )  # fmt: skip
        hidden = self.model(
            inputs.input_ids,
            inputs.positions,
            self.caches,
            inputs.metadata,
            self.backend,
            num_layers=self.num_layers,
        )  # [num_tokens, hidden]
        ends = inputs.metadata.query_start_loc.tolist()[1:]
        rows = [r for end, n in zip(ends, counts, strict=True) for r in range(end - n, end)]
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=device)])
        logprobs = torch.log_softmax(logits, dim=-1).cpu()  # [sum(counts), vocab]
        return list(logprobs.split(counts))

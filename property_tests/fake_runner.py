"""A torch-free stand-in for the model runner, shared by scheduler tests.

It models the device and host KV as dicts, performs the scheduler's swaps
and copies, writes each chunk's tokens into its slots, and samples from the
context read back through the block table: a wrong block table, prefix hit,
swap or copy changes the output or fails the assertion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from streamgen.runner.batch import ModelBatch, RunnerOutput
from streamgen.scheduler import SchedulerOutput
from streamgen.spec.acceptance import accept_path
from streamgen.spec.tree import DraftTree


class FakeRunner:
    """``next_token(context)`` is the model; ``seeded``: it is ``next_token(context, seed)``
    with the request's ``SamplingParams.seed`` (0 when None), so that requests of one
    prompt (parallel samples) write different tokens into their slots."""

    def __init__(
        self, block_size: int, next_token: Callable[..., int], seeded: bool = False
    ) -> None:
        self.block_size = block_size
        self.model = next_token
        self.seeded = seeded
        self.device: dict[int, dict[int, int]] = {}
        self.host: dict[int, dict[int, int]] = {}

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        bs = self.block_size
        for dev, host in out.blocks_to_swap_out:
            self.host[host] = dict(self.device.get(dev, {}))
        for host, dev in out.blocks_to_swap_in:
            self.device[dev] = dict(self.host[host])
        for src, dst in out.blocks_to_copy:
            self.device[dst] = dict(self.device.get(src, {}))
        request_ids, token_ids = [], []
        for chunk in out.batch.chunks:
            table = chunk.block_table
            assert len(table) * bs >= chunk.end_pos
            for i, token in enumerate(chunk.token_ids):
                pos = chunk.start_pos + i
                self.device.setdefault(table[pos // bs], {})[pos % bs] = token
            if chunk.sampling is not None:
                tree = chunk.tree or DraftTree()
                root_end = chunk.end_pos - len(tree)
                context = [self.device.get(table[p // bs], {}).get(p % bs) for p in range(root_end)]
                known = [*chunk.sampling.prompt_token_ids, *chunk.sampling.output_token_ids]
                assert context == known, (chunk.request_id, context, known)
                # Verify the tree: row r's "draw" is the true next token after its path.
                seed = (chunk.sampling.params.seed or 0,) if self.seeded else ()
                drawn = [self.model(known, *seed)] + [
                    self.model(known + [tree.tokens[n] for n in tree.path_to(node)], *seed)
                    for node in range(len(tree))
                ]
                acceptance = accept_path(tree, drawn)
                for depth, node in enumerate(acceptance.nodes, start=1):  # move the KV
                    src, dst = chunk.start_pos + 1 + node, chunk.start_pos + depth
                    value = self.device[table[src // bs]][src % bs]
                    self.device.setdefault(table[dst // bs], {})[dst % bs] = value
                request_ids.extend([chunk.request_id] * len(acceptance.token_ids))
                token_ids.extend(acceptance.token_ids)
        return RunnerOutput(request_ids=request_ids, token_ids=token_ids)


def attach_fake_trees(
    out: SchedulerOutput, next_token: Callable[..., int], salt: int, seeded: bool = False
) -> SchedulerOutput:
    """Give every request with a draft budget a tree mixing right and wrong drafts
    (``seeded`` as for :class:`FakeRunner`)."""
    chunks = []
    for chunk in out.batch.chunks:
        budget = out.draft_budgets.get(chunk.request_id)
        if budget is None or chunk.sampling is None:
            chunks.append(chunk)
            continue
        max_nodes, max_depth = budget
        known = [*chunk.sampling.prompt_token_ids, *chunk.sampling.output_token_ids]
        seed = (chunk.sampling.params.seed or 0,) if seeded else ()
        right: list[int] = []
        for _ in range(max_depth):
            right.append(next_token(known + right, *seed))
        cut = (salt + len(known)) % (max_depth + 1)  # the first wrong draft's depth
        wrong = [*right[:cut], 1000 + salt % 7, *right[cut + 1 :]]
        tree = DraftTree.from_paths(
            [wrong, right] if salt % 2 else [right[:cut], wrong], max_nodes=max_nodes
        )
        chunks.append(replace(chunk, token_ids=[*chunk.token_ids, *tree.tokens], tree=tree))
    return replace(out, batch=ModelBatch(chunks))

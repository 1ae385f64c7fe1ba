"""A torch-free stand-in for the model runner, shared by scheduler tests.

It models the device and host KV as dicts, performs the scheduler's swaps
and copies, writes each chunk's tokens into its slots, and samples from the
context read back through the block table: a wrong block table, prefix hit,
swap or copy changes the output or fails the assertion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from streamgen.runner.batch import RunnerOutput
from streamgen.scheduler import SchedulerOutput


class FakeRunner:
    def __init__(self, block_size: int, next_token: Callable[[Sequence[int]], int]) -> None:
        self.block_size = block_size
        self.next_token = next_token
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
                context = [
                    self.device.get(table[p // bs], {}).get(p % bs) for p in range(chunk.end_pos)
                ]
                known = [*chunk.sampling.prompt_token_ids, *chunk.sampling.output_token_ids]
                assert context == known, (chunk.request_id, context, known)
                request_ids.append(chunk.request_id)
                token_ids.append(self.next_token(known))
        return RunnerOutput(request_ids=request_ids, token_ids=token_ids)

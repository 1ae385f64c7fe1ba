"""Random allocate / share / free sequences never break the block pool's invariants."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from invariants import check_block_pool

from streamgen.errors import CapacityError
from streamgen.kv import BlockPool


class BlockPoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(12)
        self.owned: dict[str, list[int]] = {}
        self.next_id = 0

    @rule(num=st.integers(0, 14))
    def allocate(self, num: int) -> None:
        if num > self.pool.num_free:
            try:
                self.pool.allocate(num)
            except CapacityError:
                return
            raise AssertionError("over-allocation was not refused")
        self.owned[f"r{self.next_id}"] = self.pool.allocate(num)
        self.next_id += 1

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def share(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.owned)))
        blocks = list(self.owned[owner])
        self.pool.share(blocks)
        self.owned[f"r{self.next_id}"] = blocks
        self.next_id += 1

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.owned)))
        self.pool.free(self.owned.pop(owner))

    @invariant()
    def pool_is_consistent(self) -> None:
        check_block_pool(self.pool, self.owned)


TestBlockPool = BlockPoolMachine.TestCase
TestBlockPool.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)

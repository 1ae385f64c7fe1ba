"""Random admit / compute / grow / fork / free / swap sequences keep the block
manager's invariants, and every computed token stays readable in its slot."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from invariants import check_block_contents, check_block_manager

from streamgen.errors import CapacityError
from streamgen.kv import BlockManager

BLOCK_SIZE = 4
# A three-token alphabet so prompts often share prefixes (and prefix hits happen).
tokens_strategy = st.lists(st.integers(0, 2), min_size=1, max_size=20)


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(num_blocks=16, block_size=BLOCK_SIZE, num_host_blocks=8)
        self.token_ids: dict[str, list[int]] = {}
        self.fork_family: dict[str, int] = {}
        # Model of the KV data: block id -> {slot: token id}.
        self.device: dict[int, dict[int, int]] = {}
        self.host: dict[int, dict[int, int]] = {}
        self.next_id = 0

    def _new_id(self) -> str:
        self.next_id += 1
        return f"r{self.next_id}"

    def _on_device(self) -> list[str]:
        return sorted(r for r in self.token_ids if not self.bm.is_swapped(r))

    def _swapped(self) -> list[str]:
        return sorted(r for r in self.token_ids if self.bm.is_swapped(r))

    def _clear(self, block_ids: list[int]) -> None:
        for block in block_ids:
            self.device[block] = {}  # fresh block: whatever it held is garbage

    @rule(tokens=tokens_strategy)
    def add_request(self, tokens: list[int]) -> None:
        request_id = self._new_id()
        fits = self.bm.can_allocate(request_id, len(tokens), token_ids=tokens)
        hit = self.bm.get_computed_prefix(request_id, tokens)
        assert hit % BLOCK_SIZE == 0 and hit <= len(tokens) - 1
        try:
            new_ids = self.bm.allocate(request_id, len(tokens))
        except CapacityError:
            assert not fits
            self.bm.free(request_id)
            return
        assert fits
        self._clear(new_ids)
        self.token_ids[request_id] = list(tokens)
        self.fork_family[request_id] = self.next_id

    @precondition(lambda self: self._on_device())
    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(self._on_device()))
        tokens = self.token_ids[request_id]
        start = self.bm.num_computed_tokens(request_id)
        if start == len(tokens):
            return
        end = data.draw(st.integers(start + 1, len(tokens)))
        before = self.bm.block_table(request_id)
        try:
            copies = self.bm.prepare_append(request_id)
        except CapacityError:
            assert self.bm.block_table(request_id) == before
            return
        table = self.bm.block_table(request_id)
        self._clear([b for b in table if b not in before])
        for src, dst in copies:
            self.device[dst] = dict(self.device[src])
        for pos in range(start, end):
            block = table[pos // BLOCK_SIZE]
            assert self.bm.refcount(block) == 1, "write into a shared block"
            self.device[block][pos % BLOCK_SIZE] = tokens[pos]
        self.bm.commit_full_blocks(request_id, tokens, end)

    @precondition(lambda self: self._on_device())
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def grow(self, data: st.DataObject, extra: list[int]) -> None:
        request_id = data.draw(st.sampled_from(self._on_device()))
        num_tokens = len(self.token_ids[request_id]) + len(extra)
        try:
            new_ids = self.bm.allocate(request_id, num_tokens)
        except CapacityError:
            return
        self._clear(new_ids)
        self.token_ids[request_id].extend(extra)

    @precondition(lambda self: self._on_device())
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent_id = data.draw(st.sampled_from(self._on_device()))
        child_id = self._new_id()
        self.bm.fork(parent_id, child_id)
        self.token_ids[child_id] = list(self.token_ids[parent_id])
        self.fork_family[child_id] = self.fork_family[parent_id]

    @precondition(lambda self: self.token_ids)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.token_ids)))
        self.bm.free(request_id)
        del self.token_ids[request_id], self.fork_family[request_id]

    @precondition(lambda self: self._on_device())
    @rule(data=st.data())
    def swap_out(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(self._on_device()))
        table = self.bm.block_table(request_id)
        try:
            copies = self.bm.swap_out(request_id)
        except CapacityError:
            assert self.bm.block_table(request_id) == table
            return
        assert [d for d, _ in copies] == table
        for device_block, host_block in copies:
            self.host[host_block] = dict(self.device[device_block])

    @precondition(lambda self: self._swapped())
    @rule(data=st.data())
    def swap_in(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(self._swapped()))
        num_host = len(self.bm.host_block_table(request_id))
        try:
            copies = self.bm.swap_in(request_id)
        except CapacityError:
            assert self.bm.is_swapped(request_id)
            return
        assert len(copies) == num_host == len(self.bm.block_table(request_id))
        for host_block, device_block in copies:
            self.device[device_block] = dict(self.host[host_block])

    @invariant()
    def manager_is_consistent(self) -> None:
        check_block_manager(self.bm, self.fork_family)
        check_block_contents(self.bm, self.token_ids, self.device)


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)

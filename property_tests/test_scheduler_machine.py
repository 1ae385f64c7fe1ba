"""Random add / fork / step / abort / set_priority / add_credit / speculate sequences
keep the scheduler's invariants, every generated token equals what an
unconstrained run produces (speculative steps included: right and wrong
drafts, rejected slots trimmed; forked samples included: each its own seed, so a
write into a block it still shares would change its siblings' tokens), and once
credit flows again every request finishes."""

from __future__ import annotations

from collections.abc import Sequence

from fake_runner import FakeRunner, attach_fake_trees
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from invariants import check_scheduler, check_scheduler_output

from streamgen.kv import BlockManager
from streamgen.sampling_params import SamplingParams
from streamgen.scheduler import (
    UNLIMITED_CREDIT,
    PreemptionMode,
    Request,
    Scheduler,
    SchedulerConfig,
)

BLOCK_SIZE = 4
# A three-token alphabet so prompts often share prefixes (and prefix hits happen).
prompt_strategy = st.lists(st.integers(0, 2), min_size=1, max_size=14)
credit_strategy = st.one_of(st.just(UNLIMITED_CREDIT), st.integers(0, 3))


def next_token(tokens: Sequence[int], seed: int = 0) -> int:
    return (sum(tokens) * 31 + len(tokens) + 7 * seed) % 97 + 3


class SchedulerMachine(RuleBasedStateMachine):
    mode: PreemptionMode = "recompute"

    def __init__(self) -> None:
        super().__init__()
        self.config = SchedulerConfig(
            max_num_batched_tokens=12,
            max_num_seqs=3,
            long_prefill_chunk=8,
            preemption_mode=self.mode,
            block_size=BLOCK_SIZE,
        )
        bm = BlockManager(num_blocks=10, block_size=BLOCK_SIZE, num_host_blocks=6)
        self.scheduler = Scheduler(self.config, bm, max_model_len=36)
        self.runner = FakeRunner(BLOCK_SIZE, next_token, seeded=True)
        self.prompts: dict[str, list[int]] = {}
        self.seeds: dict[str, int] = {}
        self.outputs: dict[str, list[int]] = {}
        self.gone: set[str] = set()
        self.next_id = 0
        self.num_steps = 0

    def _live(self) -> list[str]:
        return sorted(self.prompts)

    @rule(
        prompt=prompt_strategy,
        priority=st.integers(0, 3),
        max_tokens=st.integers(1, 8),
        credit=credit_strategy,
    )
    def add_request(self, prompt: list[int], priority: int, max_tokens: int, credit: int) -> None:
        self.next_id += 1
        rid = f"r{self.next_id}"
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        self.scheduler.add_request(Request(rid, prompt, params, priority=priority, credit=credit))
        self.prompts[rid] = list(prompt)
        self.outputs[rid] = []
        self.seeds[rid] = 0

    @precondition(lambda self: self.prompts)
    @rule(data=st.data(), seed=st.integers(1, 5), credit=credit_strategy)
    def fork(self, data: st.DataObject, seed: int, credit: int) -> None:
        """A parallel sample of a live request's prompt (forked if the parent is still
        before its last prompt token, an ordinary request otherwise)."""
        parent_id = data.draw(st.sampled_from(self._live()))
        parent = self.scheduler.get_request(parent_id)
        assert parent is not None
        self.next_id += 1
        rid = f"r{self.next_id}"
        params = SamplingParams(temperature=0.0, max_tokens=parent.params.max_tokens, seed=seed)
        child = Request(rid, parent.prompt_token_ids, params, parent.priority, credit=credit,
                        fork_parent=parent_id)  # fmt: skip
        self.scheduler.add_request(child)
        self.prompts[rid] = list(parent.prompt_token_ids)
        self.outputs[rid] = []
        self.seeds[rid] = seed

    @rule()
    def step(self) -> None:
        out = self.scheduler.schedule()
        check_scheduler_output(out, self.config)
        self.num_steps += 1
        out = attach_fake_trees(out, next_token, salt=self.num_steps, seeded=True)
        for rid, tokens, reason in self.scheduler.update(self.runner.execute(out)):
            self.outputs[rid].extend(tokens)
            context = list(self.prompts[rid])
            for token in self.outputs[rid]:  # same tokens as an unconstrained run
                assert token == next_token(context, self.seeds[rid]), rid
                context.append(token)
            if reason is not None:
                del self.prompts[rid]
                self.gone.add(rid)

    @precondition(lambda self: self.prompts)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self._live()))
        assert self.scheduler.abort_request(rid)
        del self.prompts[rid]
        self.gone.add(rid)

    @precondition(lambda self: self.prompts)
    @rule(data=st.data(), nodes=st.integers(0, 5), depth=st.integers(1, 4))
    def speculate(self, data: st.DataObject, nodes: int, depth: int) -> None:
        """Let a request verify draft trees (right and wrong drafts mixed)."""
        request = self.scheduler.get_request(data.draw(st.sampled_from(self._live())))
        assert request is not None
        request.max_draft_nodes, request.max_draft_depth = nodes, depth

    @precondition(lambda self: self.prompts)
    @rule(data=st.data(), priority=st.integers(0, 3))
    def set_priority(self, data: st.DataObject, priority: int) -> None:
        assert self.scheduler.set_priority(data.draw(st.sampled_from(self._live())), priority)

    @precondition(lambda self: self.prompts)
    @rule(data=st.data(), credit=st.integers(0, 4))
    def add_credit(self, data: st.DataObject, credit: int) -> None:
        assert self.scheduler.add_credit(data.draw(st.sampled_from(self._live())), credit)

    @invariant()
    def scheduler_is_consistent(self) -> None:
        check_scheduler(self.scheduler, self.prompts, self.gone)

    def teardown(self) -> None:
        # Liveness: with credit for everyone, every request finishes in bounded steps.
        for rid in self._live():
            self.scheduler.add_credit(rid, UNLIMITED_CREDIT)
        for _ in range(400):
            if not self.scheduler.has_unfinished():
                break
            self.step()
            check_scheduler(self.scheduler, self.prompts, self.gone)
        assert not self.scheduler.has_unfinished(), self.scheduler.stats()
        assert self.scheduler.block_manager.num_used_blocks == 0


class SwapSchedulerMachine(SchedulerMachine):
    mode: PreemptionMode = "swap"


machine_settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
TestSchedulerRecompute = SchedulerMachine.TestCase
TestSchedulerRecompute.settings = machine_settings
TestSchedulerSwap = SwapSchedulerMachine.TestCase
TestSchedulerSwap.settings = machine_settings

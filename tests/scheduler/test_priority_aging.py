"""Opt-in priority aging on the pure scheduler, with a fake clock (no sleeping)."""

from __future__ import annotations

from fake_runner import FakeRunner

from streamgen.kv import BlockManager
from streamgen.sampling_params import SamplingParams
from streamgen.scheduler import Request, Scheduler, SchedulerConfig


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_under_load(aging_s: float | None, steps: int = 200) -> tuple[int | None, int]:
    """One slot; a request of priority 0 waits while priority-3 requests keep coming
    (a new one whenever the running one finishes), one second per step. Returns the
    step at which the low request first ran (None: never) and how many high ones ran."""
    clock = FakeClock()
    bm = BlockManager(64, 4)
    config = SchedulerConfig(block_size=4, max_num_seqs=1, priority_aging_s=aging_s)
    s = Scheduler(config, bm, max_model_len=64, clock=clock)
    runner = FakeRunner(4, lambda tokens: 5)

    def params() -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    s.add_request(Request("low", [1, 2, 3], params(), priority=0))
    highs = 0
    s.add_request(Request(f"high-{highs}", [1, 2, 3], params(), priority=3))
    first_low = None
    for step in range(steps):
        clock.now = float(step)
        out = s.schedule()
        if "low" in out.num_scheduled_tokens and first_low is None:
            first_low = step
        for _, _, reason in s.update(runner.execute(out)):
            if reason is not None and s.get_request(f"high-{highs}") is None:
                highs += 1
                s.add_request(Request(f"high-{highs}", [1, 2, 3], params(), priority=3))
        if s.get_request(f"high-{highs}") is None:
            highs += 1
            s.add_request(Request(f"high-{highs}", [1, 2, 3], params(), priority=3))
    return first_low, highs


def test_strict_priority_starves_the_low_request_by_default() -> None:
    first_low, highs = run_under_load(None)
    assert first_low is None and highs > 20


def test_aging_lets_the_low_request_run_after_its_priority_catches_up() -> None:
    first_low, _ = run_under_load(10.0)
    # After 30 s its effective priority (0 + one per 10 s) ties the highs' 3; among equals
    # the earlier arrival goes first, so it takes the slot when the running high finishes
    # (each takes a handful of steps): between 30 and 40 s.
    assert first_low is not None and 30 <= first_low < 40


def test_aging_counts_from_the_last_preemption() -> None:
    clock = FakeClock()
    s = Scheduler(
        SchedulerConfig(block_size=4, priority_aging_s=1.0), BlockManager(64, 4),
        max_model_len=64, clock=clock,
    )  # fmt: skip
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=4), priority=2)
    s.add_request(req)
    clock.now = 7.5
    assert req.effective_priority(clock.now, 1.0) == 9
    assert req.effective_priority(clock.now, None) == 2

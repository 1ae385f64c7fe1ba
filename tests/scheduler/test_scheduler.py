"""Scheduler tests with a fake runner (no torch): the next token is a
deterministic function of the context, read back through the block tables
from a model of the KV cache, so wrong block tables or wrong prefix hits
change the output."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from fake_runner import FakeRunner

from streamgen.errors import CapacityError, ConfigError, InvalidPromptError, RequestError
from streamgen.kv import BlockManager
from streamgen.runner.batch import RunnerOutput
from streamgen.sampling_params import SamplingParams
from streamgen.scheduler import (
    UNLIMITED_CREDIT,
    FinishReason,
    Request,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    SchedulerStats,
)


def next_token(tokens: Sequence[int]) -> int:
    return (sum(tokens) * 31 + len(tokens)) % 97 + 3


def make_scheduler(
    num_blocks: int = 256,
    *,
    block_size: int = 4,
    max_model_len: int = 512,
    num_host_blocks: int = 256,
    eos_token_ids: Sequence[int] = (),
    **config: object,
) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, num_host_blocks=num_host_blocks)
    cfg = SchedulerConfig(block_size=block_size, **config)  # type: ignore[arg-type]
    return Scheduler(cfg, bm, max_model_len=max_model_len, eos_token_ids=eos_token_ids)


def make_request(
    rid: str,
    prompt: Sequence[int],
    max_tokens: int = 8,
    priority: int = 0,
    credit: int = UNLIMITED_CREDIT,
) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return Request(rid, list(prompt), params, priority=priority, credit=credit)


def check_blocks(s: Scheduler) -> None:
    bm = s.block_manager
    assert bm.num_free_blocks + bm.num_used_blocks + bm.num_cached_blocks == bm.num_total_blocks
    live = set(s.running_ids()) | set(s.swapped_ids())
    assert set(bm.request_ids()) == live


def step(
    s: Scheduler, runner: FakeRunner, outputs: dict[str, list[int]]
) -> tuple[SchedulerOutput, list[tuple[str, list[int], FinishReason | None]]]:
    out = s.schedule()
    assert out.total_num_scheduled_tokens <= s.config.max_num_batched_tokens
    assert len(s.running_ids()) <= s.config.max_num_seqs
    for chunk in out.batch.chunks:
        assert chunk.num_tokens == out.num_scheduled_tokens[chunk.request_id] > 0
    events = s.update(runner.execute(out))
    for rid, tokens, _ in events:
        outputs.setdefault(rid, []).extend(tokens)
    check_blocks(s)
    return out, events


def run(
    s: Scheduler,
    requests: Sequence[Request],
    max_steps: int = 2000,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, list[int]]:
    runner = FakeRunner(s.config.block_size, next_token)
    for req in requests:
        s.add_request(req)
    outputs: dict[str, list[int]] = {}
    for i in range(max_steps):
        if not s.has_unfinished():
            return outputs
        step(s, runner, outputs)
        if on_step is not None:
            on_step(i)
    raise AssertionError(f"not finished after {max_steps} steps: {s.stats()}")


def reference(prompt: Sequence[int], max_tokens: int) -> list[int]:
    tokens, out = list(prompt), []
    for _ in range(max_tokens):
        out.append(next_token(tokens))
        tokens.append(out[-1])
    return out


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    return [[(seed + 7 * i + 3 * j) % 11 for j in range(length + i % 5)] for i in range(n)]


# ----- basic behaviour ---------------------------------------------------------------


def test_outputs_match_reference_and_budget_is_respected() -> None:
    s = make_scheduler(max_num_batched_tokens=24)
    ps = prompts(8, 10)
    reqs = [make_request(f"r{i}", p, max_tokens=12) for i, p in enumerate(ps)]
    outputs = run(s, reqs)
    for i, p in enumerate(ps):
        assert outputs[f"r{i}"] == reference(p, 12)
    assert s.stats().num_preemptions == 0
    assert s.block_manager.num_used_blocks == 0


def test_chunked_prefill_of_long_prompt_mixed_with_decodes() -> None:
    s = make_scheduler(max_num_batched_tokens=16)
    runner, outputs = FakeRunner(4, next_token), {}
    s.add_request(make_request("short", [1, 2, 3], max_tokens=20))
    step(s, runner, outputs)  # short prefilled, first token out
    long_prompt = [(5 * j) % 13 for j in range(50)]
    s.add_request(make_request("long", long_prompt, max_tokens=3))
    chunks = []
    while "long" not in outputs:
        out, _ = step(s, runner, outputs)
        assert out.num_scheduled_tokens.get("short") == 1  # decode every step
        chunks.append(next(c for c in out.batch.chunks if c.request_id == "long"))
    assert len(chunks) >= 4
    assert [c.start_pos for c in chunks] == [
        sum(c.num_tokens for c in chunks[:i]) for i in range(len(chunks))
    ]
    assert all(c.sampling is None for c in chunks[:-1]) and chunks[-1].sampling is not None
    assert sum(c.num_tokens for c in chunks) == 50
    while s.has_unfinished():
        step(s, runner, outputs)
    assert outputs["long"] == reference(long_prompt, 3)
    assert outputs["short"] == reference([1, 2, 3], 20)


def test_long_prefill_chunk_caps_one_request() -> None:
    s = make_scheduler(max_num_batched_tokens=64, long_prefill_chunk=8)
    runner, outputs = FakeRunner(4, next_token), {}
    s.add_request(make_request("a", list(range(30)), max_tokens=2))
    out, _ = step(s, runner, outputs)
    assert out.num_scheduled_tokens == {"a": 8}


def test_prefix_sharing_hits_cached_blocks() -> None:
    s = make_scheduler(block_size=16, max_model_len=256)
    runner, outputs = FakeRunner(16, next_token), {}
    prefix = [(3 * j + 1) % 17 for j in range(48)]
    s.add_request(make_request("a", [*prefix, 1, 2], max_tokens=4))
    step(s, runner, outputs)
    s.add_request(make_request("b", [*prefix, 9, 9, 9], max_tokens=4))
    out, _ = step(s, runner, outputs)
    chunk_b = next(c for c in out.batch.chunks if c.request_id == "b")
    assert chunk_b.start_pos == 48 and out.num_scheduled_tokens["b"] == 3
    assert (
        chunk_b.block_table[:3]
        == next(c for c in out.batch.chunks if c.request_id == "a").block_table[:3]
    )
    while s.has_unfinished():
        step(s, runner, outputs)
    assert outputs["b"] == reference([*prefix, 9, 9, 9], 4)


def test_max_num_seqs_respected() -> None:
    s = make_scheduler(max_num_seqs=3)
    seen = []
    reqs = [make_request(f"r{i}", p, 5) for i, p in enumerate(prompts(10, 6))]
    run(s, reqs, on_step=lambda _: seen.append(len(s.running_ids())))
    assert max(seen) == 3


# ----- preemption ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("num_blocks", [7, 10])
def test_preemption_gives_unconstrained_outputs(mode: str, num_blocks: int) -> None:
    ps = prompts(6, 7, seed=1)
    reqs = [make_request(f"r{i}", p, max_tokens=14) for i, p in enumerate(ps)]
    big = run(
        make_scheduler(1024), [make_request(r.request_id, r.prompt_token_ids, 14) for r in reqs]
    )
    s = make_scheduler(num_blocks, preemption_mode=mode, num_host_blocks=64)
    small = run(s, reqs)
    assert small == big
    assert s.stats().num_preemptions > 0


def test_swap_falls_back_to_recompute_when_host_pool_is_full() -> None:
    ps = prompts(5, 7, seed=2)
    s = make_scheduler(6, preemption_mode="swap", num_host_blocks=0)
    outputs = run(s, [make_request(f"r{i}", p, 10) for i, p in enumerate(ps)])
    assert outputs == {f"r{i}": reference(p, 10) for i, p in enumerate(ps)}
    assert s.stats().num_preemptions > 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_high_priority_request_preempts_full_pool(mode: str) -> None:
    s = make_scheduler(8, preemption_mode=mode, max_num_batched_tokens=64)
    runner, outputs = FakeRunner(4, next_token), {}
    for i, p in enumerate(prompts(4, 6)):
        s.add_request(make_request(f"low{i}", p, max_tokens=60))
    for _ in range(6):
        step(s, runner, outputs)
    assert s.block_manager.num_free_blocks == 0  # the pool is full of priority-0 work
    s.add_request(make_request("vip", [4, 4, 4, 4, 4, 4, 4], max_tokens=3, priority=10))
    for _ in range(3):
        step(s, runner, outputs)
        if "vip" in outputs:
            break
    assert "vip" in outputs
    while s.has_unfinished():
        step(s, runner, outputs)
    assert outputs["vip"] == reference([4] * 7, 3)


def test_priority_wins_a_slot_at_max_num_seqs() -> None:
    s = make_scheduler(max_num_seqs=2)
    runner, outputs = FakeRunner(4, next_token), {}
    s.add_request(make_request("a", [1, 2], max_tokens=50))
    s.add_request(make_request("b", [3, 4], max_tokens=50))
    step(s, runner, outputs)
    s.add_request(make_request("c", [5, 6], max_tokens=50, priority=0))
    out, _ = step(s, runner, outputs)
    assert "c" not in out.num_scheduled_tokens  # equal priority waits
    assert s.set_priority("c", 3)
    out, _ = step(s, runner, outputs)  # takes effect on the very next step
    assert "c" in out.num_scheduled_tokens and out.preempted_ids == ["b"]
    out, _ = step(s, runner, outputs)
    assert out.preempted_ids == [] and "b" not in out.num_scheduled_tokens  # no bounce back


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_equal_priority_requests_do_not_ping_pong(mode: str) -> None:
    # 4 blocks of 4 tokens: one request (6 prompt + 9 output = 15 tokens) at a time.
    s = make_scheduler(4, preemption_mode=mode)
    a, b = [1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]
    outputs = run(s, [make_request("a", a, 9), make_request("b", b, 9)], max_steps=200)
    assert outputs == {"a": reference(a, 9), "b": reference(b, 9)}
    assert s.stats().num_preemptions <= 2


# ----- commands ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_abort_frees_blocks_in_every_state(mode: str) -> None:
    s = make_scheduler(6, preemption_mode=mode)
    runner, outputs = FakeRunner(4, next_token), {}
    for i, p in enumerate(prompts(4, 7)):
        s.add_request(make_request(f"r{i}", p, max_tokens=30))
    for _ in range(8):
        step(s, runner, outputs)
    victims = s.running_ids()[:1] + s.waiting_ids()[:1] + s.swapped_ids()[:1]
    assert len(victims) >= 2
    for rid in victims:
        assert s.abort_request(rid)
        assert rid not in s.block_manager
        check_blocks(s)
    assert not s.abort_request(victims[0])  # already gone
    while s.has_unfinished():
        step(s, runner, outputs)
    assert s.block_manager.num_used_blocks == 0


def test_abort_between_schedule_and_update_drops_its_token() -> None:
    s = make_scheduler()
    runner = FakeRunner(4, next_token)
    s.add_request(make_request("a", [1, 2, 3]))
    s.add_request(make_request("b", [3, 2, 1]))
    out = s.schedule()
    s.abort_request("a")
    events = s.update(runner.execute(out))
    assert [e[0] for e in events] == ["b"]
    check_blocks(s)


def test_zero_credit_pauses_request_and_credit_resumes_it() -> None:
    s = make_scheduler()
    runner, outputs = FakeRunner(4, next_token), {}
    s.add_request(make_request("slow", [1, 2, 3], max_tokens=10, credit=2))
    s.add_request(make_request("fast", [3, 2, 1], max_tokens=10))
    for _ in range(6):
        out, _ = step(s, runner, outputs)
    assert len(outputs["slow"]) == 2 and "slow" not in out.num_scheduled_tokens
    assert len(outputs["fast"]) == 6
    assert s.add_credit("slow", 100)
    while s.has_unfinished():
        step(s, runner, outputs)
    assert outputs["slow"] == reference([1, 2, 3], 10)


def test_finish_on_eos_stop_ids_and_context_limit() -> None:
    eos = next_token([1, 2, 3])
    s = make_scheduler(eos_token_ids=[eos], max_model_len=8)
    runner = FakeRunner(4, next_token)
    s.add_request(make_request("eos", [1, 2, 3]))
    ignore = Request("ignore", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    s.add_request(ignore)
    stop_tok = next_token([5, 5])
    s.add_request(Request("stop", [5, 5], SamplingParams(stop_token_ids=[stop_tok])))
    s.add_request(make_request("ctx", [7, 7, 7, 7, 7, 7], max_tokens=50))
    finished: dict[str, tuple[int, FinishReason | None]] = {}
    counts: dict[str, int] = {}
    while s.has_unfinished():
        for rid, toks, reason in s.update(runner.execute(s.schedule())):
            counts[rid] = counts.get(rid, 0) + len(toks)
            if reason is not None:
                finished[rid] = (counts[rid], reason)
    assert finished == {
        "eos": (1, FinishReason.STOP),
        "ignore": (3, FinishReason.LENGTH),
        "stop": (1, FinishReason.STOP),
        "ctx": (2, FinishReason.LENGTH),
    }


def test_validation_before_queueing() -> None:
    s = make_scheduler(4, max_model_len=32)
    with pytest.raises(InvalidPromptError, match="empty"):
        s.add_request(make_request("a", []))
    with pytest.raises(InvalidPromptError, match="max_model_len"):
        s.add_request(make_request("a", [1] * 33))
    with pytest.raises(CapacityError, match="KV blocks"):
        s.add_request(make_request("a", [1] * 17))
    s.add_request(make_request("a", [1]))
    with pytest.raises(RequestError, match="already in use"):
        s.add_request(make_request("a", [2]))
    assert s.stats().num_waiting == 1


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        SchedulerConfig(max_num_batched_tokens=0)
    with pytest.raises(ConfigError):
        SchedulerConfig(preemption_mode="drop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        SchedulerConfig(long_prefill_chunk=0)
    with pytest.raises(ConfigError, match="block_size"):
        Scheduler(SchedulerConfig(block_size=8), BlockManager(4, 4), max_model_len=16)


def test_update_rejects_output_that_does_not_match_the_schedule() -> None:
    s = make_scheduler(max_num_batched_tokens=2)
    s.add_request(make_request("a", [1, 2, 3]))
    s.schedule()  # a 2-token chunk: nothing to sample yet
    with pytest.raises(ValueError, match="unexpected"):
        s.update(RunnerOutput(["a"], [5]))
    assert s.update(RunnerOutput()) == []  # the failed update changed nothing
    s.schedule()  # the last prompt token: must sample
    with pytest.raises(ValueError, match="missing"):
        s.update(RunnerOutput())
    assert s.update(RunnerOutput(["a"], [5])) == [("a", [5], None)]


def test_stats_count_queues_and_preemptions() -> None:
    s = make_scheduler(max_num_seqs=1)
    runner, outputs = FakeRunner(4, next_token), {}
    s.add_request(make_request("a", [1, 2], max_tokens=3))
    s.add_request(make_request("b", [2, 1], max_tokens=3))
    step(s, runner, outputs)
    assert s.stats() == SchedulerStats(
        num_running=1, num_waiting=1, num_swapped=0, num_preemptions=0
    )

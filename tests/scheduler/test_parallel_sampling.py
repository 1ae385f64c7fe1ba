"""Parallel sampling in the scheduler: requests forking off a parent's prompt share its
KV blocks (counted: the prompt is computed once, the partial last block is copied on
write, full blocks stay shared), each then samples on its own (the fake model mixes in
the request's seed, so a write into a still-shared block would change a sibling's
tokens), and every fork that cannot be made falls back to an ordinary request."""

from __future__ import annotations

from collections.abc import Sequence

from fake_runner import FakeRunner

from streamgen.kv import BlockManager
from streamgen.sampling_params import SamplingParams
from streamgen.scheduler import Request, Scheduler, SchedulerConfig
from streamgen.scheduler.request import RequestStatus

BLOCK = 4


def model(tokens: Sequence[int], seed: int = 0) -> int:
    return (sum(tokens) * 31 + len(tokens) + 7 * seed) % 97 + 3


def reference(prompt: Sequence[int], seed: int, max_tokens: int) -> list[int]:
    tokens, out = list(prompt), []
    for _ in range(max_tokens):
        out.append(model(tokens, seed))
        tokens.append(out[-1])
    return out


def scheduler(max_num_seqs: int = 8, chunk: int | None = None, caching: bool = True) -> Scheduler:
    config = SchedulerConfig(
        block_size=BLOCK, max_num_seqs=max_num_seqs, long_prefill_chunk=chunk,
        max_num_batched_tokens=64,
    )  # fmt: skip
    bm = BlockManager(64, BLOCK, enable_prefix_caching=caching, num_host_blocks=16)
    return Scheduler(config, bm, max_model_len=256)


def family(prompt: list[int], n: int, max_tokens: int = 6) -> list[Request]:
    return [
        Request(f"c{i}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, seed=i),
                fork_parent="c0" if i else None)
        for i in range(n)
    ]  # fmt: skip


def run(
    s: Scheduler, requests: list[Request]
) -> tuple[dict[str, list[int]], int, list[tuple[int, int]]]:
    """Outputs, prompt tokens computed (chunks that did not reach a sample included), and
    every copy-on-write the scheduler asked for."""
    num_prompt = len(requests[0].prompt_token_ids)
    runner = FakeRunner(BLOCK, model, seeded=True)
    for request in requests:
        s.add_request(request)
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    prompt_tokens, copies = 0, []
    for _ in range(200):
        if not s.has_unfinished():
            break
        out = s.schedule()
        copies += out.blocks_to_copy
        for c in out.batch.chunks:
            prompt_tokens += max(0, min(c.end_pos, num_prompt) - c.start_pos)
        for rid, tokens, _ in s.update(runner.execute(out)):
            outputs[rid] += tokens
    assert not s.has_unfinished() and s.block_manager.num_used_blocks == 0
    return outputs, prompt_tokens, copies


def test_the_prompt_is_computed_once_and_each_sample_is_its_own() -> None:
    prompt = list(range(1, 11))  # 10 tokens: blocks [4, 4, 2]; the fork point is 9
    s = scheduler()
    outputs, prompt_tokens, copies = run(s, family(prompt, 3))
    for i in range(3):
        assert outputs[f"c{i}"] == reference(prompt, i, 6)
    assert prompt_tokens == 9 + 3  # once up to the fork point, then its last token each
    assert len(copies) == 2  # the shared partial block, for two of the three writers
    assert s.stats().num_forks == 2


def test_a_fork_at_a_block_boundary_copies_nothing() -> None:
    prompt = list(range(1, 10))  # 9 tokens: the fork point (8) ends a block
    outputs, prompt_tokens, copies = run(scheduler(), family(prompt, 4))
    assert [outputs[f"c{i}"] for i in range(4)] == [reference(prompt, i, 6) for i in range(4)]
    assert prompt_tokens == 8 + 4 and copies == []


def test_chunked_prefill_holds_the_parent_at_the_fork_point() -> None:
    prompt = [(3 * j) % 13 for j in range(23)]
    outputs, prompt_tokens, _ = run(scheduler(chunk=5), family(prompt, 2))
    assert [outputs["c0"], outputs["c1"]] == [reference(prompt, i, 6) for i in range(2)]
    assert prompt_tokens == 22 + 2


def test_forks_past_the_running_slots_become_ordinary_requests() -> None:
    prompt = list(range(1, 11))
    s = scheduler(max_num_seqs=2)
    outputs, prompt_tokens, _ = run(s, family(prompt, 3))
    assert [outputs[f"c{i}"] for i in range(3)] == [reference(prompt, i, 6) for i in range(3)]
    assert s.stats().num_forks == 1
    assert prompt_tokens == 9 + 2 + (10 - 8)  # the third computes after its 2-block hit


def test_an_aborted_parent_releases_its_forks() -> None:
    prompt = list(range(1, 30))
    s = scheduler(chunk=4)
    requests = family(prompt, 3)
    for request in requests:
        s.add_request(request)
    assert s.forking_ids() == ["c1", "c2"]
    runner = FakeRunner(BLOCK, model, seeded=True)
    s.update(runner.execute(s.schedule()))  # the parent computed its first chunk
    assert s.abort_request("c0")
    assert s.forking_ids() == [] and sorted(s.waiting_ids()) == ["c1", "c2"]
    assert all(s.get_request(r).status is RequestStatus.WAITING for r in ("c1", "c2"))
    assert s.abort_request("c1")  # an aborted fork-to-be is simply gone
    output: list[int] = []
    while s.has_unfinished():
        for _, tokens, _ in s.update(runner.execute(s.schedule())):
            output += tokens
    assert output == reference(prompt, 2, 6)
    assert s.block_manager.num_used_blocks == 0


def test_aborting_every_fork_to_be_lets_the_parent_run_on() -> None:
    prompt = list(range(1, 12))
    s = scheduler()
    for request in family(prompt, 2):
        s.add_request(request)
    assert s.abort_request("c1")
    assert s.get_request("c0").hold_at is None
    runner = FakeRunner(BLOCK, model, seeded=True)
    out = s.schedule()
    assert out.num_scheduled_tokens == {"c0": 11}  # no hold: the whole prompt at once
    s.update(runner.execute(out))


def test_a_parent_past_its_fork_point_or_of_another_prompt_is_not_forked() -> None:
    s = scheduler()
    s.add_request(Request("p", [1, 2, 3], SamplingParams(max_tokens=4)))
    runner = FakeRunner(BLOCK, model, seeded=True)
    s.update(runner.execute(s.schedule()))  # the parent sampled: too late to fork
    s.add_request(Request("late", [1, 2, 3], SamplingParams(max_tokens=4), fork_parent="p"))
    s.add_request(Request("other", [1, 2], SamplingParams(max_tokens=4), fork_parent="p"))
    s.add_request(Request("orphan", [1, 2, 3], SamplingParams(max_tokens=4), fork_parent="x"))
    assert s.forking_ids() == []
    assert sorted(s.waiting_ids()) == ["late", "orphan", "other"]
    assert all(s.get_request(r).fork_parent is None for r in ("late", "orphan", "other"))

"""Drive the real EngineCore step by step on the test's thread (no background
thread, no event loop), checking the block manager after every step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from invariants import check_block_manager

from streamgen.checkpoint.loader import LoadedModel
from streamgen.engine.core import EngineCore, StepEvents
from streamgen.engine.events import Abort, TokenEvent
from streamgen.engine.metrics import RequestMetrics
from streamgen.kv import BlockManager
from streamgen.runner.kv_cache import KVCacheConfig
from streamgen.runner.model_runner import ModelRunner
from streamgen.sampling_params import SamplingParams
from streamgen.scheduler import Request, Scheduler, SchedulerConfig
from streamgen.spec.config import SpeculationConfig
from streamgen.spec.factory import make_drafter
from streamgen.spec.metrics import SpeculationMetrics
from streamgen.spec.policy import SpeculationPolicy


@dataclass
class CoreRun:
    outputs: dict[str, list[int]] = field(default_factory=dict)
    finish: dict[str, str | None] = field(default_factory=dict)
    metrics: dict[str, SpeculationMetrics] = field(default_factory=dict)
    steps: int = 0
    preemptions: int = 0
    core: EngineCore | None = None


def run_core(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    speculation: SpeculationConfig | None = None,
    *,
    num_blocks: int = 128,
    budget: int = 64,
    preemption_mode: str = "recompute",
    num_host_blocks: int = 0,
    draft: LoadedModel | None = None,
    cancel: Callable[[int], list[str]] | None = None,
    max_steps: int = 2000,
) -> CoreRun:
    """Run every prompt to completion; ``cancel(step)`` names requests to abort."""
    block_size = 16
    runner = ModelRunner(loaded, KVCacheConfig(block_size, num_blocks),
                         num_host_blocks=num_host_blocks)
    bm = BlockManager(num_blocks, block_size, True, num_host_blocks)
    scheduler = Scheduler(
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=16,
                        preemption_mode=preemption_mode),  # type: ignore[arg-type]
        bm, max_model_len=256, eos_token_ids=loaded.spec.eos_token_ids,
    )
    run = CoreRun()

    def deliver(events: StepEvents) -> None:
        for rid, items in events.items():
            for item in items:
                if isinstance(item, TokenEvent):
                    run.outputs.setdefault(rid, []).append(item.token_id)
                    if item.finish_reason is not None:
                        run.finish[rid] = item.finish_reason
                else:
                    run.finish[rid] = getattr(item, "reason", "error")

    drafter = policy = None
    if speculation is not None:
        drafter = make_drafter(speculation, loaded, runner, draft=draft)
        policy = SpeculationPolicy(speculation)
    core = EngineCore(scheduler, runner, None, deliver, drafter=drafter, policy=policy)
    run.core = core
    for i, prompt in enumerate(prompts):
        run.metrics[f"r{i}"] = SpeculationMetrics()
        metrics = RequestMetrics(speculation=run.metrics[f"r{i}"])
        core._apply((Request(f"r{i}", list(prompt), params), metrics))
    while scheduler.has_unfinished():
        assert run.steps < max_steps, "no progress"
        core._step()
        run.steps += 1
        live = {rid: 0 for rid in bm.request_ids()}
        check_block_manager(bm, {rid: i for i, rid in enumerate(live)})
        for rid in cancel(run.steps) if cancel else []:
            core._apply(Abort(rid))
    run.preemptions = scheduler.stats().num_preemptions
    assert bm.num_used_blocks == 0
    assert bm.num_free_blocks + bm.num_cached_blocks == bm.num_total_blocks
    return run

"""An engine's core assembled from its config, and the stats read off a running one.

:func:`build_core` wires a loaded model into the runner (KV pool, attention backend,
sampler, CUDA graphs), the block manager, the scheduler and the drafter, and refuses a
KV pool that cannot hold one request of ``max_model_len`` tokens; :func:`engine_stats`
is what ``Engine.stats()`` reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from streamgen.attention.auto import resolve_backend
from streamgen.checkpoint.loader import LoadedModel, resolve_dtype
from streamgen.engine.config import EngineConfig
from streamgen.engine.core import EngineCore, StepEvents
from streamgen.errors import ConfigError
from streamgen.kv import BlockManager
from streamgen.native.qkernels import default_threads
from streamgen.runner.cuda_graph import CudaGraphConfig
from streamgen.runner.kv_cache import KVCacheConfig
from streamgen.runner.model_runner import ModelRunner
from streamgen.runner.sampler import Sampler
from streamgen.scheduler import Scheduler, SchedulerConfig
from streamgen.spec.factory import make_drafter, speculation_for
from streamgen.spec.policy import SpeculationPolicy


def build_core(
    loaded: LoadedModel,
    cfg: EngineConfig,
    max_model_len: int,
    deliver: Callable[[StepEvents], None],
) -> EngineCore:
    """The core of an engine serving ``loaded`` under ``cfg`` (not started)."""
    runner = ModelRunner(
        loaded,
        KVCacheConfig(
            cfg.block_size,
            cfg.num_kv_blocks,
            cfg.kv_cache_bytes,
            None if cfg.kv_cache_dtype is None else resolve_dtype(cfg.kv_cache_dtype),
        ),
        backend=resolve_backend(cfg.attention_backend, loaded.spec, loaded.device),
        sampler=Sampler(seed=cfg.seed, eos_token_ids=loaded.spec.eos_token_ids),
        num_host_blocks=cfg.num_host_blocks,
        cuda_graphs=CudaGraphConfig(cfg.max_num_seqs, max_model_len)
        if cfg.cuda_graphs and loaded.device.type == "cuda"
        else None,
    )
    blocks = BlockManager(
        runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching, cfg.num_host_blocks
    )
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs,
            long_prefill_chunk=cfg.long_prefill_chunk,
            preemption_mode=cfg.preemption_mode,
            block_size=cfg.block_size,
            priority_aging_s=cfg.priority_aging_s,
        ),
        blocks,
        max_model_len=max_model_len,
        eos_token_ids=loaded.spec.eos_token_ids,
    )
    check_capacity(runner.num_blocks, cfg.block_size, max_model_len)
    drafter, policy = None, None
    if cfg.speculation is not None:
        speculation = speculation_for(cfg.speculation, loaded, runner.backend)
        drafter = make_drafter(speculation, loaded, runner)
        policy = SpeculationPolicy(speculation)
    # Structured-output masks beside the forward only where it leaves CPUs idle: on a
    # CPU whose every core runs the kernels, the two would only slow each other down.
    spare_cpus = cfg.threads is not None and cfg.threads < default_threads()
    return EngineCore(
        scheduler, runner, loaded.tokenizer, deliver, drafter=drafter, policy=policy,
        overlap_masks=loaded.device.type != "cpu" or spare_cpus,
    )  # fmt: skip


def check_capacity(num_blocks: int, block_size: int, max_model_len: int) -> None:
    """A configuration that cannot hold one request of max_model_len tokens is an error
    at start, not a stream of failed requests."""
    needed = -(-max_model_len // block_size)
    if needed > num_blocks:
        raise ConfigError(
            f"the KV pool holds {num_blocks} blocks of {block_size} tokens "
            f"({num_blocks * block_size} tokens) but one request of "
            f"max_model_len={max_model_len} tokens needs {needed} blocks: raise "
            "kv_cache_bytes / num_kv_blocks or lower max_model_len"
        )


def engine_stats(core: EngineCore, *, healthy: bool) -> dict[str, Any]:
    """What ``Engine.stats()`` reports of a running core (read without locking)."""
    sched = core.scheduler.stats()
    blocks = core.scheduler.block_manager
    return {
        "healthy": healthy,
        "running": sched.num_running,
        "waiting": sched.num_waiting,
        "swapped": sched.num_swapped,
        "preemptions": sched.num_preemptions,
        "forks": sched.num_forks,  # parallel samples that forked a prompt's KV blocks
        "kv_blocks_total": blocks.num_total_blocks,
        "kv_blocks_free": blocks.num_free_blocks,
        "kv_blocks_used": blocks.num_used_blocks,
        "kv_blocks_cached": blocks.num_cached_blocks,
        "kv_cache_dtype": str(core.runner.kv_cache.dtype).removeprefix("torch."),
        "steps": core.num_steps,
        # Where a step's time goes: the model's forward + LM head (kernel_s) and the
        # host work around it (scheduling, input prep, sampling, text, delivery).
        "step_time": {
            "total_s": core.step_seconds,
            "kernel_s": core.runner.kernel_seconds,
            "host_s": max(0.0, core.step_seconds - core.runner.kernel_seconds),
            "host_ms_per_step": 1e3
            * max(0.0, core.step_seconds - core.runner.kernel_seconds)
            / max(1, core.num_steps),
        },
        "generated_tokens": core.throughput.total_tokens,
        "throughput_tok_s": core.throughput.tokens_per_second(),
        "attention_backend": core.runner.backend.name,
        "cuda_graphs": core.runner.graphs is not None,
        # Small CPU decode steps in one native call (model/native_decode.py).
        "native_decode": core.runner.loaded.model.native_decoder is not None,
        "speculation": None
        if core.spec.drafter is None
        else {"method": core.spec.drafter.name, **core.spec.metrics.as_dict()},
    }

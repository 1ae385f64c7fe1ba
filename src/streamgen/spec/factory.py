"""Build the drafter an engine's :class:`SpeculationConfig` asks for."""

from __future__ import annotations

import dataclasses
import logging

from streamgen.attention.backend import AttentionBackend
from streamgen.checkpoint.loader import LoadedModel, load_model
from streamgen.errors import ConfigError
from streamgen.runner.kv_cache import KVCacheConfig, PagedKVCache
from streamgen.runner.model_runner import ModelRunner
from streamgen.spec.config import SpeculationConfig
from streamgen.spec.drafter import Drafter
from streamgen.spec.model_drafter import ModelDrafter
from streamgen.spec.ngram import NgramDrafter

logger = logging.getLogger(__name__)


def speculation_for(
    config: SpeculationConfig, target: LoadedModel, backend: AttentionBackend
) -> SpeculationConfig:
    """``config`` as ``target`` can run it on ``backend`` (the runner's). A sliding-window
    model drafts branching trees where the backend counts each node's window from its
    depth (``AttentionBackend.windowed_trees``: every built-in backend), and chains
    (``branching=1``) on one that does not say so (a third party's): a chain's verify
    step is a causal chunk, whose rows sit at their own positions, so every backend
    applies the window as for any chunk.

    Example:
        >>> config = speculation_for(SpeculationConfig(branching=2), gemma, other)  # doctest: +SKIP
        >>> config.branching  # doctest: +SKIP
        1
    """
    spec = target.spec
    windowed = spec.sliding_window is not None or spec.local_window is not None
    if not windowed or config.branching == 1 or backend.windowed_trees:
        return config
    logger.info("sliding-window model on the %s backend: speculation drafts chains "
                "(branching %d -> 1)", backend.name, config.branching)  # fmt: skip
    return dataclasses.replace(config, branching=1)


def make_drafter(
    config: SpeculationConfig,
    target: LoadedModel,
    runner: ModelRunner,
    draft: LoadedModel | None = None,
) -> Drafter:
    """The drafter for ``config`` over ``runner``'s KV cache.

    ``draft`` overrides loading ``config.draft_model`` (tests pass a model in).

    A sliding-window target drafts chains where the runner's backend needs them
    (``speculation_for``).

    Raises:
        ConfigError: the draft model's vocabulary differs from the target's, or
            ``self_layers`` is not below the target's layer count.
    """
    spec = target.spec
    config = speculation_for(config, target, runner.backend)
    if config.method == "ngram":
        return NgramDrafter(config.min_ngram, config.max_ngram, config.branching)
    # The draft forwards share the target's backend instance (they run between
    # the target's steps, and every forward plans its own metadata): a compiled
    # backend (flex) keeps one compile cache.
    backend = runner.backend
    if config.method == "self":
        num_layers = config.self_layers or max(1, spec.num_layers // 4)
        if num_layers >= spec.num_layers:
            raise ConfigError(
                f"self_layers={num_layers} must be below the target's {spec.num_layers} layers"
            )
        return ModelDrafter(
            "self",
            target.model,
            runner.kv_cache.layers[:num_layers],
            backend,
            runner.block_size,
            num_layers=num_layers,
            branching=config.branching,
            shares_target_cache=True,
        )
    if draft is None:
        assert config.draft_model is not None  # SpeculationConfig checks it
        draft = load_model(
            config.draft_model, dtype=target.dtype, device=target.device, load_tokenizer=False
        )
    if draft.spec.vocab_size != spec.vocab_size:
        raise ConfigError(
            f"draft model vocabulary ({draft.spec.vocab_size}) differs from the target's "
            f"({spec.vocab_size}); the draft must share the target's tokenizer"
        )
    cache = PagedKVCache(
        draft.spec,
        KVCacheConfig(block_size=runner.block_size, num_blocks=runner.num_blocks),
        draft.dtype,
        target.device,
    )
    return ModelDrafter(
        "draft_model",
        draft.model,
        cache.layers,
        backend,
        runner.block_size,
        branching=config.branching,
    )

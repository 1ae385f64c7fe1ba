"""SpeculationConfig: which drafter, how big a tree, and whether it adapts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from streamgen.errors import ConfigError

DrafterName = Literal["ngram", "draft_model", "self"]

# A tree field left at BY_METHOD takes its method's value here: (max_nodes, max_depth,
# branching). Prompt lookup drafts chains: on the CPU a chain of 8 beat a branching tree
# of 8 (depth 6, 2 children) in 6 of 6 alternating rounds on a Zen 5 (+6 to +37% on the
# spec bench's three rewriting prompts) and a 7-node chain did by 3.6% in 4 of 4 on a
# Xeon; chains of 12 and 16 were no better than 8. The model drafters keep top-2 trees.
BY_METHOD = -1
TREE_DEFAULTS: dict[str, tuple[int, int, int]] = {
    "ngram": (8, 8, 1),
    "draft_model": (8, 6, 2),
    "self": (8, 6, 2),
}


@dataclass(frozen=True, slots=True)
class SpeculationConfig:
    """Speculative decoding for an engine (``EngineConfig.speculation``).

    Attributes:
        method: ``"ngram"`` (prompt lookup, no extra model), ``"draft_model"``
            (a smaller model sharing the target's tokenizer, ``draft_model``
            is its checkpoint directory) or ``"self"`` (the target's first
            ``self_layers`` layers + final norm + head).
        max_nodes: Largest draft tree per request and step.
        max_depth: Deepest draft path (a step emits at most ``max_depth + 1`` tokens).
        branching: Children per node for the model drafters' top-k trees
            (1 = chains); the n-gram drafter merges up to this many matches.
            Left unset, the three take the method's defaults (``TREE_DEFAULTS``):
            an 8-token chain for ``"ngram"``, 8 nodes of depth 6 with 2 children
            per node for the model drafters.
        min_ngram / max_ngram: Suffix lengths the n-gram drafter looks up.
        draft_model: Checkpoint directory of the draft model.
        self_layers: Layers the self-speculative drafter runs (``None``: a
            quarter of the target's, at least one).
        adaptive: Size each request's tree from its measured acceptance and
            the measured step cost, down to no speculation when it does not
            pay (large batches, low acceptance). ``False``: always the full
            budget.

    Example:
        >>> SpeculationConfig(method="ngram", max_nodes=12).max_depth
        8
        >>> SpeculationConfig(method="self").branching
        2
    """

    method: DrafterName = "ngram"
    max_nodes: int = BY_METHOD
    max_depth: int = BY_METHOD
    branching: int = BY_METHOD
    min_ngram: int = 2
    max_ngram: int = 4
    draft_model: str | None = None
    self_layers: int | None = None
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("ngram", "draft_model", "self"):
            raise ConfigError(
                f"speculation method must be 'ngram', 'draft_model' or 'self', got {self.method!r}"
            )
        tree_fields = ("max_nodes", "max_depth", "branching")
        for name, default in zip(tree_fields, TREE_DEFAULTS[self.method], strict=True):
            if getattr(self, name) == BY_METHOD:
                object.__setattr__(self, name, default)
        for name in (*tree_fields, "min_ngram", "max_ngram"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"speculation {name} must be an int >= 1, got {value!r}")
        if self.min_ngram > self.max_ngram:
            raise ConfigError(
                f"speculation min_ngram ({self.min_ngram}) exceeds max_ngram ({self.max_ngram})"
            )
        if self.method == "draft_model" and not self.draft_model:
            raise ConfigError("speculation method 'draft_model' needs draft_model=<checkpoint dir>")
        layers = self.self_layers
        if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int)
                                   or layers < 1):
            raise ConfigError(f"speculation self_layers must be None or >= 1, got {layers!r}")

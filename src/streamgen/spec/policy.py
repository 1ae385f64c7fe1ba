"""Adaptive speculation: give a request draft nodes only while they pay.

Two things are measured online:

* per request, the acceptance rate ``alpha`` of its draft tokens (each
  verification accepts ``a`` tokens of a path of depth ``D``: ``a``
  acceptances and, if ``a < D``, one rejection; ``alpha`` is the decayed
  ratio of acceptances to trials);
* the step cost as a line ``t(T) = c0 + c1 * T`` in the step's token count
  ``T`` (decayed least squares), plus the drafter's time per proposed node.

A step of ``R`` decoding requests makes ``R`` tokens in ``t(T)``. A draft
node at depth ``d`` of request ``r`` adds ``alpha_r ** d`` expected tokens
for ``c1 + draft_cost`` seconds, so it pays iff::

    alpha_r ** d  >=  (c1 + draft_cost) * R / t(T)     (the step's tokens per second)

A depth level of a tree with ``branching`` b holds b nodes of which at most
one is accepted, so a level must clear b times that bar. The depth budget of
a request is the largest ``d`` meeting it (0: no speculation). Under load
(large ``R``, compute-bound steps) the bar rises and speculation switches
itself off; at batch 1 it is nearly free. A request
whose budget fell to 0 is probed with a depth-1 draft every
``probe_interval`` steps, so its estimate can recover. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streamgen.spec.config import SpeculationConfig


@dataclass(slots=True)
class _Acceptance:
    accepted: float
    trials: float
    steps_off: int = 0

    @property
    def alpha(self) -> float:
        return self.accepted / self.trials if self.trials > 0 else 0.0


@dataclass(slots=True)
class _LinearCost:
    """Decayed least-squares fit of seconds = c0 + c1 * tokens."""

    decay: float
    n: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.n = self.n * d + 1
        self.sx = self.sx * d + x
        self.sy = self.sy * d + y
        self.sxx = self.sxx * d + x * x
        self.sxy = self.sxy * d + x * y

    def fit(self) -> tuple[float, float] | None:
        """``(c0, c1)``, or None until the token counts vary enough to fit a slope."""
        if self.n < 2:
            return None
        var = self.sxx * self.n - self.sx * self.sx
        if var <= 1e-9 * max(1.0, self.sxx * self.n):
            return None
        c1 = max(0.0, (self.sxy * self.n - self.sx * self.sy) / var)
        c0 = max(0.0, (self.sy - c1 * self.sx) / self.n)
        return c0, c1


@dataclass(slots=True)
class SpeculationPolicy:
    """Per-request draft budgets from measured acceptance and step cost.

    Example:
        >>> policy = SpeculationPolicy(SpeculationConfig(max_nodes=8, max_depth=4))
        >>> policy.budget("a", num_decoding=1)          # the prior: speculate
        (8, 4)
        >>> for _ in range(20):
        ...     policy.observe_verify("a", depth=4, accepted=0)
        >>> policy.budget("a", num_decoding=1)[1] < 4   # it never pays: shrink
        True
    """

    config: SpeculationConfig
    prior_alpha: float = 0.6
    prior_weight: float = 2.0
    decay: float = 0.9
    # Before the step cost is measured: the marginal cost of a token relative
    # to a whole decode step of one request (CPU decode of a small model).
    prior_token_cost_ratio: float = 0.02
    probe_interval: int = 16
    _requests: dict[str, _Acceptance] = field(default_factory=dict)
    _step_cost: _LinearCost = field(default_factory=lambda: _LinearCost(decay=0.98))
    _draft_seconds: float = 0.0
    _draft_nodes: float = 0.0

    def budget(self, request_id: str, num_decoding: int) -> tuple[int, int]:
        """``(max_nodes, max_depth)`` for the request's next step (``(0, 0)``: off)."""
        config = self.config
        if not config.adaptive:
            return config.max_nodes, config.max_depth
        stats = self._stats(request_id)
        # A depth level holds up to `branching` nodes, each paid for, while at most one
        # of them is accepted: the level must earn the bar once per node it holds.
        level_nodes = max(1, min(config.branching, config.max_nodes))
        bar = self._bar(num_decoding) * level_nodes
        depth = 0
        alpha = stats.alpha
        gain = alpha
        while depth < config.max_depth and gain >= bar:
            depth += 1
            gain *= alpha
        if depth == 0:
            stats.steps_off += 1
            if stats.steps_off >= self.probe_interval:
                stats.steps_off = 0
                return 1, 1
            return 0, 0
        stats.steps_off = 0
        nodes = min(config.max_nodes, depth * config.branching)
        return nodes, depth

    def observe_verify(self, request_id: str, depth: int, accepted: int) -> None:
        """A tree whose deepest path had ``depth`` nodes got ``accepted`` accepted."""
        if depth <= 0:
            return
        stats = self._stats(request_id)
        trials = accepted + (1 if accepted < depth else 0)
        stats.accepted = stats.accepted * self.decay + accepted
        stats.trials = stats.trials * self.decay + trials

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """The runner ran a step of ``num_tokens`` tokens in ``seconds``."""
        self._step_cost.add(float(num_tokens), seconds)

    def observe_draft(self, num_nodes: int, seconds: float) -> None:
        """The drafter proposed ``num_nodes`` nodes in ``seconds``."""
        self._draft_seconds = self._draft_seconds * 0.9 + seconds
        self._draft_nodes = self._draft_nodes * 0.9 + num_nodes

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def acceptance_rate(self, request_id: str) -> float:
        return self._stats(request_id).alpha

    # ----- internals ----------------------------------------------------------------

    def _stats(self, request_id: str) -> _Acceptance:
        stats = self._requests.get(request_id)
        if stats is None:
            stats = _Acceptance(self.prior_alpha * self.prior_weight, self.prior_weight)
            self._requests[request_id] = stats
        return stats

    def _bar(self, num_decoding: int) -> float:
        """Expected tokens a node must add to pay for itself this step."""
        fit = self._step_cost.fit()
        draft_cost = self._draft_seconds / self._draft_nodes if self._draft_nodes > 0 else 0.0
        if fit is None:
            base = self.prior_token_cost_ratio * max(1, num_decoding)
            return base / (1 + self.prior_token_cost_ratio * max(1, num_decoding))
        c0, c1 = fit
        step = c0 + c1 * max(1, num_decoding)
        if step <= 0:
            return 0.0
        return (c1 + draft_cost) * max(1, num_decoding) / step

"""The speculation part of a core step: draft budgets before scheduling, draft trees
into the scheduled batch, and what the verify step accepted afterwards.

    policy.budget --> scheduler.schedule (room for the trees) --> drafter.propose
        --> trees in the batch --> forward + verify --> record (policy, metrics)

Owned by the core thread (engine/core.py), like everything it touches.
"""

from __future__ import annotations

import time
from dataclasses import replace

from streamgen.engine.metrics import RequestMetrics
from streamgen.runner.batch import ModelBatch, RunnerOutput
from streamgen.scheduler import Request, Scheduler, SchedulerOutput
from streamgen.spec.drafter import Drafter, DraftInput
from streamgen.spec.metrics import SpeculationMetrics
from streamgen.spec.policy import SpeculationPolicy
from streamgen.spec.tree import DraftTree


class StepSpeculation:
    """A drafter and its adaptive policy (either may be None: no speculation, or fixed
    budgets), with the engine-wide speculation metrics."""

    def __init__(
        self,
        drafter: Drafter | None,
        policy: SpeculationPolicy | None,
        speculate_by_default: bool = True,
    ) -> None:
        self.drafter = drafter
        self.policy = policy
        self._speculate_by_default = speculate_by_default
        self.metrics = SpeculationMetrics()

    def wants_speculation(self, request: Request) -> bool:
        choice = request.params.speculation
        return self._speculate_by_default if choice is None else choice

    def set_budgets(self, scheduler: Scheduler) -> None:
        """Give each decoding request this step's draft budget from the policy."""
        if self.drafter is None or self.policy is None:
            return
        running = [scheduler.get_request(rid) for rid in scheduler.running_ids()]
        decoding = [
            r for r in running if r is not None and r.num_tokens - r.num_computed_tokens == 1
        ]
        for req in decoding:
            if self.wants_speculation(req):
                nodes, depth = self.policy.budget(req.request_id, len(decoding))
            else:
                nodes, depth = 0, 0
            req.max_draft_nodes, req.max_draft_depth = nodes, depth

    def attach_drafts(
        self, scheduler: Scheduler, output: SchedulerOutput
    ) -> tuple[ModelBatch, dict[str, DraftTree]]:
        """Ask the drafter for the trees the scheduler made room for; put them in the batch."""
        budgets = output.draft_budgets
        if self.drafter is None or not budgets:
            return output.batch, {}
        started = time.perf_counter()
        inputs: list[DraftInput] = []
        for chunk in output.batch.chunks:
            budget = budgets.get(chunk.request_id)
            if budget is None:
                continue
            req = scheduler.get_request(chunk.request_id)
            assert req is not None  # scheduled this step, so running
            inputs.append(
                DraftInput(
                    chunk.request_id,
                    req.prompt_token_ids,
                    req.output_token_ids,
                    req.num_computed_tokens,
                    chunk.block_table,
                    *budget,
                )
            )
        proposals = self.drafter.propose(inputs)
        trees = {
            inp.request_id: tree.truncate(inp.max_nodes).limit_depth(inp.max_depth)
            for inp, tree in zip(inputs, proposals, strict=True)
        }
        for rid, tree in trees.items():  # structured outputs: the branches the grammar allows
            grammar = scheduler.get_request(rid).grammar  # type: ignore[union-attr]
            if grammar is not None:
                trees[rid] = grammar.cut_tree(tree)
        trees = {rid: tree for rid, tree in trees.items() if len(tree)}
        seconds = time.perf_counter() - started
        self.metrics.draft_seconds += seconds
        if self.policy is not None:
            self.policy.observe_draft(sum(len(t) for t in trees.values()), seconds)
        if not trees:
            return output.batch, {}
        chunks = [
            chunk
            if chunk.request_id not in trees
            else replace(
                chunk,
                token_ids=[*chunk.token_ids, *trees[chunk.request_id].tokens],
                tree=trees[chunk.request_id],
            )
            for chunk in output.batch.chunks
        ]
        return ModelBatch(chunks), trees

    def record(
        self,
        batch: ModelBatch,
        trees: dict[str, DraftTree],
        result: RunnerOutput,
        seconds: float,
        request_metrics: dict[str, RequestMetrics],
    ) -> None:
        """What the step cost and, per tree, how many of its tokens were accepted."""
        if self.policy is not None:
            self.policy.observe_step(batch.num_tokens, seconds)
        if not trees:
            return
        self.metrics.verify_seconds += seconds
        emitted: dict[str, int] = {}
        for rid in result.request_ids:
            emitted[rid] = emitted.get(rid, 0) + 1
        for rid, tree in trees.items():
            accepted = emitted.get(rid, 1) - 1
            self.metrics.record(len(tree), accepted)
            metrics = request_metrics.get(rid)
            if metrics is not None:
                metrics.speculation.record(len(tree), accepted)
            if self.policy is not None:
                self.policy.observe_verify(rid, tree.max_depth, accepted)

    def reset(self, request_id: str) -> None:
        """A preempted request: its draft state starts over."""
        if self.drafter is not None:
            self.drafter.reset(request_id)

    def forget(self, request_id: str) -> None:
        if self.drafter is not None:
            self.drafter.forget(request_id)
        if self.policy is not None:
            self.policy.forget(request_id)

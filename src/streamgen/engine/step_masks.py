"""The structured-outputs part of a core step: each constrained sampling row gets its
grammar's token mask, computed beside the forward where CPUs are free for it.

Owned by the core thread (engine/core.py); the mask worker thread only runs
``constrain`` while the core thread runs the forward, and nothing else touches those
grammar states until the step's sampling waits for the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from streamgen.runner.batch import ModelBatch
from streamgen.scheduler import Scheduler
from streamgen.structured.state import GrammarState, masks_for


class StepMasks:
    """overlap: compute the masks on a worker thread beside the forward (llguidance and
    the kernels both release the GIL): for a GPU, or fewer kernel threads than CPUs."""

    def __init__(self, overlap: bool = False) -> None:
        self._overlap = overlap
        self._worker: ThreadPoolExecutor | None = None
        self.seconds = 0.0  # computing the grammars' token masks

    def prepare(
        self, scheduler: Scheduler, batch: ModelBatch
    ) -> tuple[ModelBatch, Callable[[], ModelBatch] | None]:
        """The batch with its masks, or the batch and a call that waits for the masked
        one (overlapped: the runner takes it where sampling needs it)."""
        rows = self._constrained_rows(scheduler, batch) if scheduler.has_constrained() else []
        if not rows:
            return batch, None
        if self._overlap:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="streamgen-masks")
            return batch, self._worker.submit(self._constrain, batch, rows).result
        return self._constrain(batch, rows), None

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=False)

    @staticmethod
    def _constrained_rows(
        scheduler: Scheduler, batch: ModelBatch
    ) -> list[tuple[int, GrammarState]]:
        """The sampling chunks of constrained requests: (chunk index, grammar state)."""
        rows: list[tuple[int, GrammarState]] = []
        for i, chunk in enumerate(batch.chunks):
            if chunk.sampling is None:
                continue
            req = scheduler.get_request(chunk.request_id)
            if req is not None and req.grammar is not None:
                rows.append((i, req.grammar))
        return rows

    def _constrain(self, batch: ModelBatch, rows: list[tuple[int, GrammarState]]) -> ModelBatch:
        """Each constrained sampling row gets its grammar's mask (the decode rows' all at
        once, in parallel; a tree's nodes each after its path)."""
        started = time.perf_counter()
        masks = masks_for([grammar for _, grammar in rows])  # [rows, words]
        chunks = list(batch.chunks)
        for (i, grammar), mask in zip(rows, masks, strict=True):
            chunk = chunks[i]
            assert chunk.sampling is not None
            chunks[i] = replace(
                chunk,
                sampling=replace(chunk.sampling, allowed=mask),
                tree_allowed=tuple(grammar.tree_masks(chunk.tree)) if chunk.tree else (),
            )
        self.seconds += time.perf_counter() - started
        return ModelBatch(chunks)

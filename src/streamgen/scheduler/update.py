"""Applying a runner's output to the scheduled requests (Scheduler.update's parts).

Pure functions over requests: checking that the output matches the schedule, and one
request taking its sampled tokens (a plain step's one, or a verify step's accepted
drafts plus one).
"""

from __future__ import annotations

from streamgen.runner.batch import RunnerOutput
from streamgen.scheduler.request import FinishReason, Request


def sampled_tokens(
    output: RunnerOutput,
    scheduled: dict[str, int],
    requests: dict[str, Request],
    drafts: dict[str, tuple[int, int]],
) -> tuple[dict[str, list[int]], set[str]]:
    """Each request's sampled tokens, and the requests that had to sample (those whose
    scheduled tokens reach their end). Tokens of requests aborted since the schedule are
    dropped.

    Raises:
        ValueError: the output samples for a request that should not sample, misses one
            that should, or gives several tokens to one that did not speculate.
    """
    sampled: dict[str, list[int]] = {}
    for rid, token in zip(output.request_ids, output.token_ids, strict=True):
        sampled.setdefault(rid, []).append(token)
    expected = {
        rid
        for rid, n in scheduled.items()
        if requests[rid].num_computed_tokens + n == requests[rid].num_tokens
    }
    unexpected = {rid for rid in sampled if rid in requests} - expected
    missing = expected - set(sampled)
    if unexpected or missing:
        raise ValueError(
            f"runner output does not match the schedule: unexpected {sorted(unexpected)}, "
            f"missing {sorted(missing)}"
        )
    bad = [rid for rid in expected if len(sampled[rid]) > 1 and rid not in drafts]
    if bad:
        raise ValueError(f"runner emitted several tokens for non-speculating {sorted(bad)}")
    return sampled, expected


def take_tokens(
    req: Request, tokens: list[int], eos_token_ids: frozenset[int], context_limit: int
) -> tuple[list[int], FinishReason | None]:
    """Append ``tokens`` to ``req``'s output up to the first that finishes it (EOS, a
    length limit, its grammar's end), spending credit and advancing its grammar; the
    tokens taken and why it finished (None: it goes on)."""
    emitted: list[int] = []
    reason = None
    for token in tokens:
        req.output_token_ids.append(token)
        req.credit -= 1
        emitted.append(token)
        if req.grammar is not None:
            req.grammar.advance(token)
        reason = req.finish_check(token, eos_token_ids, context_limit)
        if reason is not None:
            break
    return emitted, reason

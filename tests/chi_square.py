"""Pearson's chi-square goodness-of-fit test (no scipy): counts vs expected probabilities."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping

import torch


def chi_square_p_value(counts: Counter[Hashable], probs: Mapping[Hashable, float]) -> float:
    """p-value that ``counts`` were drawn from ``probs``.

    Categories expected fewer than 5 times are pooled into one bin; an
    observed category outside ``probs`` gives p = 0.
    """
    total = sum(counts.values())
    if any(key not in probs or probs[key] <= 0 for key in counts):
        return 0.0
    observed: list[float] = []
    expected: list[float] = []
    pooled_obs = pooled_exp = 0.0
    for key, p in probs.items():
        exp = p * total
        if exp < 5:
            pooled_obs += counts.get(key, 0)
            pooled_exp += exp
        else:
            observed.append(counts.get(key, 0))
            expected.append(exp)
    if pooled_exp > 0:
        observed.append(pooled_obs)
        expected.append(pooled_exp)
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    dof = len(observed) - 1
    if dof < 1:
        return 1.0
    # Survival function of chi2(dof) = regularized upper incomplete gamma.
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))

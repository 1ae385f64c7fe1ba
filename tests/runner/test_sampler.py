"""Sampler: penalties, filters, seeding, distribution and logprobs, each
checked against a reference computed independently in the test (numpy,
plain Python, or transformers' own logits processors)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from streamgen.runner.sampler import Sampler, SamplingRequest, apply_penalties, argmax_rows
from streamgen.sampling_params import SamplingParams

# --------------------------------------------------------------------------- helpers


def make_request(
    *, prompt: Sequence[int] = (0,), output: Sequence[int] = (), **params: Any
) -> SamplingRequest:
    return SamplingRequest(
        params=SamplingParams(**params),
        prompt_token_ids=list(prompt),
        output_token_ids=list(output),
    )


def random_logits(num_rows: int, vocab_size: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    # [num_rows, vocab_size] float32, distinct values (no ties)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(0.0, scale, (num_rows, vocab_size)).astype(np.float32))


def reference_penalties(logits: torch.Tensor, requests: Sequence[SamplingRequest]) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor, then OpenAI presence /
    frequency penalties in plain Python floats."""
    rows = []
    for row, request in enumerate(requests):
        params = request.params
        scores = logits[row : row + 1].clone()
        if params.repetition_penalty != 1.0:
            input_ids = torch.tensor([[*request.prompt_token_ids, *request.output_token_ids]])
            scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(input_ids, scores)
        values = scores[0].tolist()
        for token_id, count in Counter(request.output_token_ids).items():
            values[token_id] -= params.presence_penalty * (count > 0)
            values[token_id] -= params.frequency_penalty * count
        rows.append(values)
    return torch.tensor(rows, dtype=torch.float32)


def reference_probs(
    logits: np.ndarray,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> np.ndarray:
    """The distribution a row should be sampled from, in float64 numpy:
    temperature, then top-k, top-p (smallest top set reaching top_p), min-p."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")  # best first
    keep = np.zeros(z.shape, dtype=bool)
    keep[order[: top_k if top_k > 0 else len(z)]] = True

    def softmax_kept() -> np.ndarray:
        w = np.where(keep, np.exp(z - z[keep].max()), 0.0)
        return w / w.sum()

    probs = softmax_kept()
    mass_before = 0.0
    for token in order:
        if not keep[token]:
            continue
        if mass_before >= top_p:
            keep[token] = False
        elif top_p < 1.0:
            assert abs(mass_before - top_p) > 1e-4, "top_p too close to a boundary for float32"
        mass_before += probs[token]
    probs = softmax_kept()
    keep &= probs >= min_p * probs.max()
    return softmax_kept()


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square goodness of fit; 0 if a zero-probability bin was hit."""
    if counts[probs == 0].sum() > 0:
        return 0.0
    observed = counts[probs > 0].astype(np.float64)
    expected = probs[probs > 0] * counts.sum()
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = len(observed) - 1
    # survival function of chi2(dof): regularized upper incomplete gamma
    return float(
        torch.special.gammaincc(
            torch.tensor(dof / 2, dtype=torch.float64),
            torch.tensor(statistic / 2, dtype=torch.float64),
        )
    )


def generate(
    sampler: Sampler,
    target: SamplingRequest,
    num_steps: int,
    vocab_size: int,
    companions: Sequence[SamplingRequest] = (),
    row: int = 0,
) -> list[int]:
    """Runs `target` for num_steps steps, in row `row` among `companions`; the
    logits of step s are a fixed function of s, the same in every batch."""
    output: list[int] = []
    for step in range(num_steps):
        request = SamplingRequest(target.params, target.prompt_token_ids, list(output))
        batch = [*companions[:row], request, *companions[row:]]
        logits = random_logits(len(batch), vocab_size, seed=1000 + step, scale=1.0)
        logits[row] = random_logits(1, vocab_size, seed=step, scale=1.0)[0]
        output.append(sampler.sample(logits, batch).token_ids[row])
    return output


# --------------------------------------------------------------------------- basics


def test_empty_requests_give_empty_result() -> None:
    result = Sampler(seed=0).sample(torch.empty(0, 10), [])
    assert result.token_ids == [] and result.logprobs == [] and result.top_logprobs is None


def test_row_count_mismatch_rejected() -> None:
    with pytest.raises(ValueError, match="num_rows"):
        Sampler(seed=0).sample(torch.zeros(2, 5), [make_request()])
    with pytest.raises(ValueError, match="num_rows"):
        Sampler(seed=0).sample(torch.zeros(5), [make_request()])


def test_logits_are_not_modified() -> None:
    logits = random_logits(3, 20, seed=1)
    before = logits.clone()
    requests = [
        make_request(prompt=[1, 2], output=[3, 3], repetition_penalty=1.5, frequency_penalty=1.0),
        make_request(output=[4], min_tokens=5, stop_token_ids=[4], top_k=3, top_p=0.5, min_p=0.2),
        make_request(temperature=0.0, presence_penalty=1.0, output=[2]),
    ]
    Sampler(seed=0, eos_token_ids=(5,)).sample(logits, requests)
    apply_penalties(logits, requests)
    assert torch.equal(logits, before)


def test_low_precision_logits_computed_in_float32() -> None:
    logits = random_logits(4, 30, seed=2).to(torch.bfloat16)
    requests = [make_request(temperature=0.0, logprobs=2) for _ in range(4)]
    result = Sampler(seed=0).sample(logits, requests)
    assert result.token_ids == logits.float().argmax(dim=-1).tolist()
    expected = torch.log_softmax(logits.float(), dim=-1)
    for row, token in enumerate(result.token_ids):
        assert result.logprobs[row] == pytest.approx(expected[row, token].item(), abs=1e-6)


# --------------------------------------------------------------------------- penalties


def test_repetition_penalty_matches_transformers() -> None:
    logits = random_logits(5, 40, seed=3)
    requests = [
        make_request(prompt=[1, 2, 2, 39], output=[5, 1], repetition_penalty=1.3),
        make_request(prompt=[0, 7], output=[7, 7, 8], repetition_penalty=0.6),
        make_request(prompt=[3], output=[], repetition_penalty=2.0),
        make_request(prompt=[4, 5], output=[6], repetition_penalty=1.0),
        make_request(prompt=list(range(40)), output=[0], repetition_penalty=1.1),
    ]
    got = apply_penalties(logits, requests)
    expected = reference_penalties(logits, requests)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The penalty actually did something on every penalized row.
    assert not torch.equal(got[:3], logits[:3]) and torch.equal(got[3], logits[3])


def test_presence_and_frequency_penalties_match_python_reference() -> None:
    logits = random_logits(4, 30, seed=4)
    requests = [
        # prompt tokens are not penalized by presence / frequency
        make_request(
            prompt=[9, 9, 9], output=[1, 1, 1, 2], presence_penalty=0.5, frequency_penalty=0.25
        ),
        make_request(prompt=[0], output=[3, 4, 3], presence_penalty=-1.5),
        make_request(prompt=[0], output=[5, 5, 6], frequency_penalty=2.0),
        make_request(prompt=[0], output=[7, 8]),
    ]
    got = apply_penalties(logits, requests)
    expected = reference_penalties(logits, requests)
    torch.testing.assert_close(got, expected)
    assert got[0, 9] == logits[0, 9]
    assert got[0, 1].item() == pytest.approx(logits[0, 1].item() - 0.5 - 0.75, abs=1e-6)
    assert torch.equal(got[3], logits[3])


def test_all_penalties_combined_match_reference() -> None:
    logits = random_logits(3, 25, seed=5)
    requests = [
        make_request(
            prompt=[1, 2, 3],
            output=[3, 4, 4, 24],
            repetition_penalty=1.4,
            presence_penalty=0.3,
            frequency_penalty=-0.7,
        ),
        make_request(prompt=[0, 0], output=[0, 1], repetition_penalty=0.8, frequency_penalty=1.0),
        make_request(prompt=[5], output=[], presence_penalty=2.0),
    ]
    torch.testing.assert_close(
        apply_penalties(logits, requests), reference_penalties(logits, requests)
    )


def test_penalties_ignore_out_of_vocab_ids_and_skip_unpenalized_batches() -> None:
    logits = random_logits(1, 10, seed=6)
    request = make_request(
        prompt=[2, 10, 500], output=[2, 11], repetition_penalty=2.0, presence_penalty=1.0
    )
    in_vocab = make_request(prompt=[2], output=[2], repetition_penalty=2.0, presence_penalty=1.0)
    torch.testing.assert_close(
        apply_penalties(logits, [request]), apply_penalties(logits, [in_vocab])
    )
    assert apply_penalties(logits, [make_request(output=[1, 1])]) is logits


# --------------------------------------------------------------------------- greedy


def test_greedy_rows_equal_argmax_of_penalized_logits_whatever_the_rng() -> None:
    logits = random_logits(4, 50, seed=7)
    requests = [
        make_request(temperature=0.0),
        make_request(temperature=0.0, top_k=3, top_p=0.1, min_p=0.9),  # filters ignored
        make_request(
            temperature=0.0, prompt=logits[2].topk(3).indices.tolist(), repetition_penalty=5.0
        ),
        make_request(temperature=0.0, seed=123),
    ]
    expected = np.argmax(reference_penalties(logits, requests).numpy(), axis=-1).tolist()
    assert expected[2] != int(logits[2].argmax())  # the penalty changed the winner
    for seed in range(5):
        assert Sampler(seed=seed).sample(logits, requests).token_ids == expected


def test_greedy_rows_consume_no_randomness() -> None:
    vocab_size = 40
    alone, beside_greedy = Sampler(seed=11), Sampler(seed=11)
    for step in range(20):
        logits = random_logits(2, vocab_size, seed=step, scale=1.0)
        random_row = make_request(output=[0] * step)
        got_alone = alone.sample(logits[:1], [random_row]).token_ids[0]
        greedy_row = make_request(temperature=0.0)
        got_mixed = beside_greedy.sample(logits.flip(0), [greedy_row, random_row]).token_ids[1]
        assert got_alone == got_mixed


# --------------------------------------------------------------------------- seeding


def test_seeded_request_independent_of_batch_and_row() -> None:
    vocab_size, steps = 200, 20
    target = make_request(seed=42)
    companions = [
        make_request(),
        make_request(seed=7),
        make_request(temperature=0.0),
        make_request(),
    ]
    reference = generate(Sampler(seed=0), target, steps, vocab_size)
    assert generate(Sampler(seed=0), target, steps, vocab_size) == reference
    for row in range(len(companions) + 1):
        in_batch = generate(Sampler(seed=row + 1), target, steps, vocab_size, companions, row)
        assert in_batch == reference
    assert len(set(reference)) > 5  # it really sampled


def test_different_seeds_give_different_sequences() -> None:
    vocab_size, steps = 200, 20
    sequences = {
        tuple(generate(Sampler(seed=0), make_request(seed=s), steps, vocab_size)) for s in range(4)
    }
    assert len(sequences) == 4


def test_seeded_request_recomputed_after_preemption_reproduces() -> None:
    vocab_size = 200
    target = make_request(seed=5, prompt=[1, 2, 3])
    tokens = generate(Sampler(seed=0), target, 15, vocab_size)
    # Recompute step 9 alone, in a fresh sampler, from the same prefix.
    logits = random_logits(1, vocab_size, seed=9, scale=1.0)
    request = SamplingRequest(target.params, target.prompt_token_ids, tokens[:9])
    assert Sampler(seed=99).sample(logits, [request]).token_ids == [tokens[9]]


def test_seeded_noise_changes_from_step_to_step() -> None:
    # Same logits at every step: only fresh noise per step can change the token.
    logits = torch.zeros(1, 200)
    request = make_request(seed=9)
    tokens = []
    for step in range(20):
        row = SamplingRequest(request.params, request.prompt_token_ids, [0] * step)
        tokens.append(Sampler(seed=0).sample(logits, [row]).token_ids[0])
    assert len(set(tokens)) > 10


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    vocab_size = 200
    a = generate(Sampler(seed=3), make_request(), 20, vocab_size)
    assert generate(Sampler(seed=3), make_request(), 20, vocab_size) == a
    assert generate(Sampler(seed=4), make_request(), 20, vocab_size) != a


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    "filters",
    [
        {"top_k": 5},
        {"top_p": 0.6},
        {"min_p": 0.1},
        {"temperature": 0.7, "top_k": 10, "top_p": 0.8, "min_p": 0.05},
        {"temperature": 2.0, "top_k": 1},
    ],
)
def test_filters_never_emit_a_filtered_token(filters: dict[str, Any]) -> None:
    num_draws, vocab_size = 2000, 50
    logits = random_logits(1, vocab_size, seed=8)[0]
    probs = reference_probs(logits.numpy(), **filters)
    allowed = set(np.flatnonzero(probs).tolist())
    assert 1 <= len(allowed) < vocab_size

    requests = [make_request(**filters) for _ in range(num_draws)]
    tokens = Sampler(seed=0).sample(logits.expand(num_draws, -1), requests).token_ids
    assert set(tokens) <= allowed
    # ...and every allowed token of non-negligible probability does come up.
    assert set(tokens) >= {t for t in allowed if probs[t] > 0.01}


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    # float32 cumulative sums fall short of 1 by more than 1e-7 on a big vocab;
    # the top token must survive anyway.
    logits = random_logits(64, 4096, seed=12, scale=0.1)
    tokens = Sampler(seed=0).sample(logits, [make_request(top_p=1e-7)] * 64).token_ids
    assert tokens == logits.argmax(dim=-1).tolist()


def test_top_k_larger_than_vocab_keeps_everything() -> None:
    logits = torch.zeros(3000, 4)
    tokens = Sampler(seed=0).sample(logits, [make_request(top_k=100)] * 3000).token_ids
    assert set(tokens) == {0, 1, 2, 3}


# --------------------------------------------------------------------------- distribution

DISTRIBUTION_LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], dtype=np.float32)


@pytest.mark.parametrize(
    ("filters", "wrong_filters"),
    [
        ({"temperature": 0.6, "top_p": 0.9}, {"temperature": 1.0, "top_p": 0.9}),
        ({"temperature": 1.7, "top_p": 0.95}, {"temperature": 1.7}),
        ({"temperature": 1.3, "top_k": 5}, {"temperature": 1.0, "top_k": 5}),
        ({"min_p": 0.2}, {}),
    ],
)
def test_empirical_distribution_matches_reference(
    filters: dict[str, Any], wrong_filters: dict[str, Any]
) -> None:
    # Fixed seed, so the test is deterministic. Over sampler seeds 0..199 the
    # p-values of the right reference were uniform on [0, 1] (as they must be)
    # and the wrong reference's never exceeded 1e-60.
    num_draws = 20_000
    logits = torch.from_numpy(DISTRIBUTION_LOGITS).expand(num_draws, -1)
    tokens = Sampler(seed=0).sample(logits, [make_request(**filters)] * num_draws).token_ids
    counts = np.bincount(tokens, minlength=len(DISTRIBUTION_LOGITS))

    assert chi_square_p_value(counts, reference_probs(DISTRIBUTION_LOGITS, **filters)) > 1e-3
    # The same test rejects a reference that ignores a parameter.
    assert chi_square_p_value(counts, reference_probs(DISTRIBUTION_LOGITS, **wrong_filters)) < 1e-3


def test_seeded_rows_distribution_matches_reference() -> None:
    # One seed per row: the per-request generators must not bias the draw.
    num_draws, temperature = 4000, 0.8
    logits = torch.from_numpy(DISTRIBUTION_LOGITS).expand(num_draws, -1)
    requests = [make_request(seed=s, temperature=temperature) for s in range(num_draws)]
    counts = np.bincount(Sampler(seed=0).sample(logits, requests).token_ids, minlength=8)
    assert chi_square_p_value(counts, reference_probs(DISTRIBUTION_LOGITS, temperature)) > 1e-3
    assert chi_square_p_value(counts, reference_probs(DISTRIBUTION_LOGITS)) < 1e-3


# --------------------------------------------------------------------------- logprobs


def test_logprobs_are_log_softmax_of_penalized_logits() -> None:
    logits = random_logits(5, 64, seed=9)
    requests = [
        make_request(logprobs=None, temperature=0.5, top_k=4),
        make_request(logprobs=0, output=[1, 1], frequency_penalty=1.0),
        make_request(logprobs=3, temperature=0.0, prompt=[5, 6], repetition_penalty=1.7),
        make_request(logprobs=20, top_p=0.3, min_p=0.2, seed=1),
        make_request(logprobs=None, temperature=3.0),
    ]
    result = Sampler(seed=0).sample(logits, requests)
    expected = torch.log_softmax(reference_penalties(logits, requests).double(), dim=-1)
    for row, token in enumerate(result.token_ids):
        assert result.logprobs[row] == pytest.approx(expected[row, token].item(), abs=1e-5)

    assert result.top_logprobs is not None
    assert (
        result.top_logprobs[0] == []
        and result.top_logprobs[1] == []
        and result.top_logprobs[4] == []
    )
    for row, k in [(2, 3), (3, 20)]:
        top = result.top_logprobs[row]
        order = torch.argsort(expected[row], descending=True)[:k].tolist()
        assert [token for token, _ in top] == order
        for token, logprob in top:
            assert logprob == pytest.approx(expected[row, token].item(), abs=1e-5)


def test_top_logprobs_none_when_no_row_asked() -> None:
    result = Sampler(seed=0).sample(random_logits(2, 10, seed=10), [make_request(), make_request()])
    assert result.top_logprobs is None
    assert len(result.logprobs) == 2 and all(lp <= 0.0 for lp in result.logprobs)


# --------------------------------------------------------------------------- min_tokens / eos

EOS, STOP = 3, 4


def stop_heavy_logits(num_rows: int) -> torch.Tensor:
    # [num_rows, 10]: EOS and the stop token dominate
    logits = torch.zeros(num_rows, 10)
    logits[:, EOS] = 20.0
    logits[:, STOP] = 19.0
    return logits


def test_min_tokens_masks_eos_and_stop_token_ids() -> None:
    sampler = Sampler(seed=0, eos_token_ids=(EOS,))
    params: dict[str, Any] = {"min_tokens": 2, "stop_token_ids": [STOP]}
    early = [
        make_request(output=[0], temperature=0.0, **params),
        *[make_request(output=[0], **params)] * 300,
    ]
    result = sampler.sample(stop_heavy_logits(len(early)), early)
    assert EOS not in result.token_ids and STOP not in result.token_ids
    # The logprob reported is the unmasked model's.
    assert result.logprobs[0] == pytest.approx(
        torch.log_softmax(stop_heavy_logits(1), -1)[0, 0].item()
    )

    done = make_request(output=[0, 0], temperature=0.0, **params)
    assert sampler.sample(stop_heavy_logits(1), [done]).token_ids == [EOS]


def test_ignore_eos_does_not_mask_eos() -> None:
    sampler = Sampler(seed=0, eos_token_ids=(EOS,))
    greedy: dict[str, Any] = {"temperature": 0.0, "stop_token_ids": [STOP]}
    assert sampler.sample(
        stop_heavy_logits(1), [make_request(ignore_eos=True, **greedy)]
    ).token_ids == [EOS]
    # With ignore_eos, EOS cannot end generation, so min_tokens masks only the stop ids.
    early = make_request(ignore_eos=True, min_tokens=3, **greedy)
    assert sampler.sample(stop_heavy_logits(1), [early]).token_ids == [EOS]
    logits = stop_heavy_logits(1)
    logits[0, EOS] = 0.0
    assert sampler.sample(logits, [early]).token_ids == [0]


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_matches_cpu_semantics() -> None:
    logits = random_logits(2000, 50, seed=8)
    requests = [make_request(top_k=5, seed=s if s % 2 else None) for s in range(1999)]
    requests.append(make_request(temperature=0.0, prompt=[1], repetition_penalty=1.5))
    result = Sampler(seed=0).sample(logits.cuda(), requests)
    cpu_greedy = Sampler(seed=0).sample(logits[-1:], requests[-1:]).token_ids[0]
    assert result.token_ids[-1] == cpu_greedy
    allowed = logits.topk(5, dim=-1).indices.tolist()
    assert all(token in allowed[row] for row, token in enumerate(result.token_ids[:-1]))
    again = Sampler(seed=1).sample(logits.cuda(), requests)
    seeded_rows = range(1, 1999, 2)
    assert [again.token_ids[r] for r in seeded_rows] == [result.token_ids[r] for r in seeded_rows]


# --------------------------------------------------------------------------- logit_bias


def test_logit_bias_adds_after_the_penalties() -> None:
    logits = random_logits(3, 30, seed=11)
    requests = [
        make_request(output=[4, 4], frequency_penalty=1.0, logit_bias={4: 2.5, 7: -100}),
        make_request(logit_bias=[(0, 1.0), (29, 3.0), (99, 50.0)]),  # 99: outside, ignored
        make_request(),
    ]
    got = apply_penalties(logits, requests)
    expected = reference_penalties(logits, requests).tolist()
    for row, request in enumerate(requests):
        for token_id, bias in request.params.logit_bias_pairs:
            if token_id < 30:
                expected[row][token_id] += bias
    torch.testing.assert_close(got, torch.tensor(expected))
    assert torch.equal(got[2], logits[2])


def test_logit_bias_bans_and_forces_greedy_tokens() -> None:
    logits = random_logits(2, 40, seed=12)
    top = int(logits[0].argmax())
    low = int(logits[1].argmin())
    requests = [
        make_request(temperature=0, logit_bias={top: -100}),
        make_request(temperature=0, logit_bias={low: 100}),
    ]
    result = Sampler(seed=0).sample(logits, requests)
    assert result.token_ids[0] != top and result.token_ids[0] == int(logits[0].topk(2).indices[1])
    assert result.token_ids[1] == low


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        ({1: 101}, r"\[-100, 100\]"),
        ({-1: 1.0}, ">= 0"),
        ({1: float("nan")}, "finite"),
        ({"a": 1.0}, "int"),
        ([(1, 2, 3)], "pairs"),
        ("1:2", "pairs"),
    ],
)
def test_bad_logit_bias_is_refused(bias: Any, message: str) -> None:
    from streamgen.errors import InvalidSamplingParamsError

    with pytest.raises(InvalidSamplingParamsError, match=message):
        SamplingParams(logit_bias=bias)


def test_logit_bias_is_stored_as_sorted_pairs() -> None:
    params = SamplingParams(logit_bias={9: 1, 2: -3.5})
    assert params.logit_bias == ((2, -3.5), (9, 1.0)) == params.logit_bias_pairs
    assert params == SamplingParams(logit_bias=[(2, -3.5), (9, 1)])


def test_argmax_rows_is_torch_argmax_ties_infinities_and_nans_included() -> None:
    """The greedy pick (numpy's argmax on the CPU) is torch's: the first of tied maxima,
    a row of -inf but one entry, a NaN taken as the largest; non-contiguous rows too."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 5, (64, 1000), generator=gen).float()  # many ties
    x[3] = float("-inf")
    x[3, 777] = 0.0
    x[5, 10] = float("nan")
    x[6] = float("-inf")  # all -inf: index 0
    for rows in (x, x[:, ::3], x[:1], torch.randn(8, 49152, generator=gen)):
        assert torch.equal(argmax_rows(rows), rows.argmax(dim=-1))

"""Per-request sampling parameters.

Invariants: a :class:`SamplingParams` that exists is valid. Every field is
checked once, in ``__post_init__``, and normalized to a canonical form
(``float`` for real-valued fields, ``int`` for counts, ``tuple`` for
sequences, ``top_k == 0`` for "no top-k"), so the scheduler and the sampler
never re-validate and two equal configurations compare equal. Field names
follow vLLM and the OpenAI API.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from streamgen.errors import InvalidSamplingParamsError
from streamgen.structured.outputs import StructuredOutputs

# Temperatures below this are treated as greedy (as vLLM does): dividing logits
# by a tiny temperature would overflow float32 and is argmax in the limit anyway.
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_LOGPROBS = 20
_MAX_OPENAI_PENALTY = 2.0
_MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next tokens of one request.

    Attributes:
        temperature: Divides the logits before sampling. ``0`` (anything below
            ``1e-5``) means greedy decoding: the argmax of the penalized logits,
            with top-k/top-p/min-p ignored and no randomness consumed.
        top_k: Sample only among the ``top_k`` most likely tokens. ``0`` or
            ``-1`` disables it (``-1`` is stored as ``0``).
        top_p: Nucleus sampling: keep the smallest set of most likely tokens
            whose probability mass reaches ``top_p`` (the top token is always
            kept). ``1.0`` disables it. Must be in ``(0, 1]``.
        min_p: Keep tokens whose probability is at least ``min_p`` times the
            top token's probability. ``0.0`` disables it. Must be in ``[0, 1]``.
        repetition_penalty: HF/vLLM semantics, over prompt and output tokens:
            positive logits of seen tokens are divided by it, negative ones
            multiplied. ``1.0`` disables it. Must be ``> 0``.
        presence_penalty: OpenAI semantics, over output tokens only: subtracted
            once from the logit of every token already generated. In ``[-2, 2]``.
        frequency_penalty: OpenAI semantics, over output tokens only:
            subtracted from a token's logit once per time it was generated.
            In ``[-2, 2]``.
        max_tokens: Maximum number of tokens to generate; ``None`` generates
            until EOS, a stop condition or the context limit. ``>= 1``.
        min_tokens: EOS and ``stop_token_ids`` cannot be sampled before this
            many tokens were generated. ``<= max_tokens``.
        stop: Strings that end generation when they appear in the output; a
            single string is accepted. Stored as a tuple of non-empty strings.
        stop_token_ids: Token ids that end generation (in addition to EOS).
            Stored as a tuple.
        ignore_eos: EOS does not end generation (it can still be sampled).
        logprobs: Number of most likely ``(token_id, logprob)`` pairs to return
            per step besides the sampled token's logprob; ``None`` returns
            none. In ``[0, 20]``.
        prompt_logprobs: The logprob of every prompt token after the first (each
            given the tokens before it), with this many most likely alternatives
            per position (``0``: the prompt token's only); ``None`` computes none.
            In ``[0, 20]``. A request asking for them computes its whole prompt
            (it takes no prefix-cache hit: a cached prefix has no logits); they
            arrive with the first token (``TokenEvent.prompt_logprobs``,
            ``stream.prompt_logprobs``).
        logit_bias: Added to the logits of the given token ids before sampling
            (OpenAI semantics: ``-100`` bans a token in practice, ``100`` all but
            forces it), after the penalties; logprobs include it. A mapping or
            ``(token_id, bias)`` pairs, biases in ``[-100, 100]``; stored as sorted
            pairs. Token ids are checked against the vocabulary at submission.
        seed: Makes the request's samples reproducible whatever else is in
            the batch; ``None`` draws from the engine's generator. Any int (it is
            hashed with the token's position into the generator's seed).
        structured_outputs: What the output must match (a JSON schema, any JSON object,
            a regex, a Lark grammar or a choice among strings:
            :class:`~streamgen.StructuredOutputs`). Each step samples from the model's
            distribution renormalised over the tokens the constraint allows (masked
            after penalties and ``logit_bias``, before ``min_tokens``, temperature and
            the filters; logprobs stay the model's). The output ends when the
            constraint is complete and nothing can follow, or at EOS where it allows
            one (also with ``ignore_eos``). A constraint that does not compile is an
            :class:`~streamgen.errors.InvalidStructuredOutputError` at submission.
        speculation: Speculative decoding for this request: ``None`` follows
            the engine (``EngineConfig.speculation``), ``False`` turns it off,
            ``True`` asks for it (a no-op on an engine without a drafter).
            Output distribution is the same either way (greedy output is
            identical); with a ``seed``, sampled tokens are reproducible per
            setting but differ between the two.

    Raises:
        InvalidSamplingParamsError: a field has the wrong type, is NaN or
            infinite, or is out of range. The message names the field.

    Example:
        >>> params = SamplingParams(temperature=0.7, top_p=0.9, stop="\\n", seed=1)
        >>> params.stop
        ('\\n',)
        >>> params.is_greedy
        False
        >>> SamplingParams(temperature=0).is_greedy
        True
        >>> SamplingParams(top_p=0.0)
        Traceback (most recent call last):
        ...
        streamgen.errors.InvalidSamplingParamsError: top_p must be in (0, 1], got 0.0
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: str | Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: Mapping[int, float] | Sequence[tuple[int, float]] = ()
    seed: int | None = None
    structured_outputs: StructuredOutputs | None = None
    speculation: bool | None = None

    def __post_init__(self) -> None:
        temperature = _real("temperature", self.temperature)
        if temperature < 0.0:
            raise _error("temperature", "must be >= 0", self.temperature)
        top_k = _integer("top_k", self.top_k)
        if top_k < -1:
            raise _error("top_k", "must be >= 1, or 0 / -1 to disable it", self.top_k)
        top_p = _real("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise _error("top_p", "must be in (0, 1]", self.top_p)
        min_p = _real("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise _error("min_p", "must be in [0, 1]", self.min_p)
        repetition_penalty = _real("repetition_penalty", self.repetition_penalty)
        if repetition_penalty <= 0.0:
            raise _error("repetition_penalty", "must be > 0", self.repetition_penalty)
        presence_penalty = _openai_penalty("presence_penalty", self.presence_penalty)
        frequency_penalty = _openai_penalty("frequency_penalty", self.frequency_penalty)
        max_tokens = None
        if self.max_tokens is not None:
            max_tokens = _integer("max_tokens", self.max_tokens)
            if max_tokens < 1:
                raise _error("max_tokens", "must be >= 1 or None", self.max_tokens)
        min_tokens = _integer("min_tokens", self.min_tokens)
        if min_tokens < 0:
            raise _error("min_tokens", "must be >= 0", self.min_tokens)
        if max_tokens is not None and min_tokens > max_tokens:
            raise _error("min_tokens", f"must be <= max_tokens ({max_tokens})", self.min_tokens)
        if not isinstance(self.ignore_eos, bool):
            raise _error("ignore_eos", "must be a bool", self.ignore_eos)
        logprobs = None
        if self.logprobs is not None:
            logprobs = _integer("logprobs", self.logprobs)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise _error("logprobs", f"must be in [0, {MAX_LOGPROBS}] or None", self.logprobs)
        prompt_logprobs = None
        if self.prompt_logprobs is not None:
            prompt_logprobs = _integer("prompt_logprobs", self.prompt_logprobs)
            if not 0 <= prompt_logprobs <= MAX_LOGPROBS:
                raise _error(
                    "prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}] or None",
                    self.prompt_logprobs,
                )  # fmt: skip
        seed = None if self.seed is None else _integer("seed", self.seed)
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputs
        ):
            raise _error(
                "structured_outputs", "must be None or a StructuredOutputs",
                type(self.structured_outputs).__name__,
            )  # fmt: skip
        if self.speculation is not None and not isinstance(self.speculation, bool):
            raise _error("speculation", "must be None or a bool", self.speculation)

        normalized = {
            "temperature": temperature,
            "top_k": max(top_k, 0),
            "top_p": top_p,
            "min_p": min_p,
            "repetition_penalty": repetition_penalty,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            "max_tokens": max_tokens,
            "min_tokens": min_tokens,
            "stop": _stop_strings(self.stop),
            "stop_token_ids": _stop_token_ids(self.stop_token_ids),
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "logit_bias": _logit_bias(self.logit_bias),
            "seed": seed,
        }
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

    @property
    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as stored: sorted ``(token_id, bias)`` pairs.

        Example:
            >>> SamplingParams(logit_bias={7: -100, 2: 5}).logit_bias_pairs
            ((2, 5.0), (7, -100.0))
        """
        pairs: tuple[tuple[int, float], ...] = self.logit_bias  # type: ignore[assignment]
        return pairs

    @property
    def is_greedy(self) -> bool:
        """Whether the next token is the argmax (``temperature`` below ``1e-5``).

        Example:
            >>> SamplingParams(temperature=0.0, top_k=5).is_greedy
            True
        """
        return self.temperature < GREEDY_TEMPERATURE_EPS


def _error(field: str, requirement: str, value: object) -> InvalidSamplingParamsError:
    return InvalidSamplingParamsError(f"{field} {requirement}, got {value!r}")


def _real(field: str, value: object) -> float:
    # bool is an int subclass; True as a temperature is a bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _error(field, "must be a real number", value)
    result = float(value)
    if not math.isfinite(result):
        raise _error(field, "must be finite", value)
    return result


def _integer(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _error(field, "must be an int", value)
    return int(value)


def _openai_penalty(field: str, value: object) -> float:
    result = _real(field, value)
    if not -_MAX_OPENAI_PENALTY <= result <= _MAX_OPENAI_PENALTY:
        raise _error(field, "must be in [-2, 2]", value)
    return result


def _stop_strings(stop: object) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence):
        raise _error("stop", "must be a str or a sequence of str", stop)
    for item in stop:
        if not isinstance(item, str):
            raise _error("stop", "must hold only str", stop)
        if not item:
            raise _error("stop", "must hold only non-empty strings", stop)
    return tuple(stop)


def _stop_token_ids(stop_token_ids: object) -> tuple[int, ...]:
    if isinstance(stop_token_ids, (str, bytes)) or not isinstance(stop_token_ids, Sequence):
        raise _error("stop_token_ids", "must be a sequence of int", stop_token_ids)
    result = []
    for item in stop_token_ids:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral) or item < 0:
            raise _error("stop_token_ids", "must hold only non-negative ints", stop_token_ids)
        result.append(int(item))
    return tuple(result)


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """A mapping or pairs -> sorted ``(token_id, bias)`` pairs, each checked."""
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        items = list(value)
        if not all(isinstance(i, Sequence) and len(i) == 2 for i in items):
            raise _error("logit_bias", "must be a mapping or (token_id, bias) pairs", value)
    else:
        raise _error("logit_bias", "must be a mapping or (token_id, bias) pairs", value)
    pairs: dict[int, float] = {}
    for token_id, bias in items:
        token = _integer("logit_bias", token_id)
        if token < 0:
            raise _error("logit_bias", "token ids must be >= 0", token_id)
        amount = _real("logit_bias", bias)
        if not -_MAX_LOGIT_BIAS <= amount <= _MAX_LOGIT_BIAS:
            raise _error("logit_bias", "biases must be in [-100, 100]", bias)
        pairs[token] = amount
    return tuple(sorted(pairs.items()))


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of parallel sample ``index`` of a request seeded ``seed``: the seed itself
    for the first, a distinct derived one for each other (so ``n`` seeded samples differ
    yet reproduce); None when unseeded.

    >>> choice_seed(7, 0), choice_seed(None, 3), choice_seed(7, 1) == choice_seed(7, 1)
    (7, None, True)
    """
    if seed is None or index == 0:
        return seed
    return hash((seed, index))

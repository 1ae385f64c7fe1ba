"""What a benchmark asks of a system: requests, per-system options, arms.

Everything here is plain data, shared by the parent (which builds the
workloads) and the workers (which run them); it crosses the process
boundary as JSON (:func:`Arm.to_json` / :meth:`Request.from_json`).
Workloads are deterministic: fixed texts (bench/texts.py) or a fixed seed.
"""

from __future__ import annotations

import dataclasses
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import texts


@dataclass(frozen=True, slots=True)
class Request:
    """One generation request: greedy, exactly ``output_len`` tokens (EOS ignored)."""

    prompt: tuple[int, ...]
    output_len: int
    arrival_s: float = 0.0  # submit time, from the start of the timed run
    read_delay_s: float = 0.0  # the consumer sleeps this long after each token (slow reader)
    tag: str = ""  # groups requests for metrics (e.g. "fast" / "slow")

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "prompt": list(self.prompt)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Request:
        return cls(**{**data, "prompt": tuple(data["prompt"])})


@dataclass(frozen=True, slots=True)
class SystemOptions:
    """Settings of one arm; each system applies those it has and refuses what it cannot do.

    A system that cannot honour a setting (prefix caching in static HF
    `generate`, speculation where it is not built) reports the arm as not
    available instead of silently running something else.
    """

    prefix_caching: bool | None = None  # None: the system's default
    speculation: str | None = None  # None: off; otherwise the method name (e.g. "ngram")
    speculative_tokens: int = 8  # draft length for systems that take one
    hf_batch_size: int = 8  # static batch size of HF `generate`
    max_num_seqs: int = 64  # streamgen engine
    max_num_batched_tokens: int = 512  # streamgen engine
    stream_buffer: int = 16  # streamgen engine: tokens a stream holds before it pauses
    kv_cache_bytes: int = 1 << 30  # streamgen engine
    stop_slow_when_fast_done: bool = False  # cancel slow readers once the others finish
    streamgen_only: bool = False  # an arm about a streamgen feature the peers do not have

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SystemOptions:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Arm:
    """One configuration of a scenario, run by every system in every repetition.

    ``warm`` requests run first, untimed, in the same session (a prefix cache
    primed with the system prompt); ``sequential`` runs the requests one
    after another (each arrives when the previous one finishes); ``metric_tag``
    restricts the throughput metric to the requests with that tag.
    """

    name: str
    requests: tuple[Request, ...]
    options: SystemOptions = field(default_factory=SystemOptions)
    warm: tuple[Request, ...] = ()
    sequential: bool = False
    metric_tag: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests": [r.to_json() for r in self.requests],
            "options": self.options.to_json(),
            "warm": [r.to_json() for r in self.warm],
            "sequential": self.sequential,
            "metric_tag": self.metric_tag,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Arm:
        return cls(
            name=data["name"],
            requests=tuple(Request.from_json(r) for r in data["requests"]),
            options=SystemOptions.from_json(data["options"]),
            warm=tuple(Request.from_json(r) for r in data["warm"]),
            sequential=data["sequential"],
            metric_tag=data["metric_tag"],
        )


@dataclass(frozen=True)
class ModelInfo:
    """The checkpoint under test, as the parent sees it (no weights loaded)."""

    model_dir: Path
    spec: Any  # streamgen.ModelSpec
    tokenizer: Any | None  # None: the checkpoint has no tokenizer (tiny test models)
    # streamgen serves the default model from its Q4_1 GGUF (the quantized path); a
    # checkpoint directory given with --model dense
    quantized: bool = False

    @classmethod
    def load(cls, model: str | None) -> ModelInfo:
        from transformers import AutoConfig

        from streamgen.checkpoint import default_model_path
        from streamgen.model.config import ModelSpec

        model_dir = Path(model) if model else default_model_path()
        spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(model_dir))
        tokenizer = None
        if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer.model").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return cls(model_dir, spec, tokenizer, quantized=model is None)

    def chat(self, user: str, system: str | None = None) -> tuple[int, ...]:
        """Token ids of a chat prompt (the model's template), ending where the reply starts.

        Without a tokenizer, every word maps to a fixed id (same text, same ids),
        so repeated words stay repeated tokens for prompt-lookup speculation.
        """
        if self.tokenizer is None:
            words = ((system or "") + " " + user).split()
            high = self.spec.vocab_size
            return tuple(3 + zlib.crc32(w.encode()) % (high - 3) for w in words)
        messages = [{"role": "user", "content": user}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return tuple(int(i) for i in ids)


def chat_mix(
    num: int, seed: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int
) -> list[Request]:
    """Chat-like traffic: log-uniform prompt and output lengths (many short, a few long).

    Prompts are random token ids (the work, not the text, is measured).
    """
    rng = random.Random(seed)

    def log_uniform(low: int, high: int) -> int:
        return round(low * (high / low) ** rng.random())

    top = min(40000, vocab)
    low = min(100, top // 2)
    requests = []
    for _ in range(num):
        prompt = tuple(rng.randrange(low, top) for _ in range(log_uniform(*prompt_range)))
        requests.append(Request(prompt, log_uniform(*output_range)))
    return requests


def poisson_arrivals(requests: list[Request], rate: float, seed: int) -> list[Request]:
    """The same requests arriving as a Poisson process of ``rate`` requests per second."""
    rng = random.Random(seed + 1)
    now, out = 0.0, []
    for request in requests:
        out.append(dataclasses.replace(request, arrival_s=round(now, 6)))
        now += rng.expovariate(rate)
    return out


def with_typos(text: str, seed: int, fraction: float = 0.06) -> str:
    """``text`` with adjacent letters swapped in a fixed random ``fraction`` of its words."""
    rng = random.Random(seed)
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) > 3 and word.isalpha() and rng.random() < fraction:
            j = rng.randrange(1, len(word) - 2)
            words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return " ".join(words)


def spec_prompts(
    info: ModelInfo, seed: int, max_words: int | None = None
) -> list[tuple[str, tuple[int, ...]]]:
    """(task name, prompt ids) of the input-grounded tasks over the fixed passage."""
    passage = texts.SPEC_PASSAGE.replace("\n", " ")
    if max_words is not None:
        passage = " ".join(passage.split(" ")[:max_words])
    out = []
    for name, template in texts.SPEC_TASKS:
        text = with_typos(passage, seed) if name == "correct" else passage
        out.append((name, info.chat(template.format(text=text))))
    return out

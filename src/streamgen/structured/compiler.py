"""Compiling structured-output constraints with llguidance, once per constraint.

``GrammarCompiler`` is built from the model's own HF tokenizer (llguidance's tokenizer
bridge, ~0.5 s for a 49k vocabulary: made on first use, off the event loop). Two
caches, both keyed by the frozen :class:`StructuredOutputs`:

* ``check`` (on the caller's thread, at submission): the llguidance grammar text,
  validated without the tokenizer (a millisecond for ordinary schemas), so a bad schema,
  regex or grammar is an :class:`InvalidStructuredOutputError` at the call;
* ``matcher`` (in a worker thread, before the request is queued): a matcher compiled
  against the tokenizer, kept pristine; each request gets a ``deep_copy`` (microseconds).

Both caches are bounded (least recently used out) and guarded by one lock.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from streamgen.errors import ConfigError, InvalidStructuredOutputError
from streamgen.structured.outputs import StructuredOutputs
from streamgen.structured.state import GrammarState

MAX_CACHED = 256


def _grammar_builders() -> dict[str, Callable[[StructuredOutputs], str]]:
    """Per kind of constraint: its llguidance grammar text."""
    from llguidance import LLMatcher

    return {
        "json": lambda so: LLMatcher.grammar_from_json_schema(so.json),
        "json_object": lambda so: LLMatcher.grammar_from_json_schema({"type": "object"}),
        "regex": lambda so: LLMatcher.grammar_from_regex(so.regex),
        "grammar": lambda so: LLMatcher.grammar_from_lark(so.grammar),
        "choice": lambda so: LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in so.choice)
        ),
    }


class GrammarCompiler:
    """Grammars and matchers for one tokenizer (one per engine).

    >>> compiler = GrammarCompiler(engine.tokenizer, eos_token_ids=(2,))  # doctest: +SKIP
    >>> matcher = compiler.matcher(StructuredOutputs(choice=["yes", "no"]))  # doctest: +SKIP
    """

    def __init__(self, hf_tokenizer: Any, eos_token_ids: Sequence[int]) -> None:
        try:
            import llguidance  # noqa: F401
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise ConfigError("structured outputs need llguidance: pip install llguidance") from exc
        self._hf_tokenizer = hf_tokenizer
        self._eos_token_ids = list(eos_token_ids)
        self._builders = _grammar_builders()
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._executor: Any = None
        self._grammars: OrderedDict[StructuredOutputs, str] = OrderedDict()
        self._matchers: OrderedDict[StructuredOutputs, Any] = OrderedDict()
        self.num_compiles = 0  # matchers compiled (cache misses), for tests and stats

    def check(self, constraint: StructuredOutputs) -> str:
        """The constraint's grammar text, validated; raises InvalidStructuredOutputError."""
        from llguidance import LLMatcher

        with self._lock:
            grammar = self._grammars.get(constraint)
            if grammar is not None:
                self._grammars.move_to_end(constraint)
                return grammar
        try:
            grammar = self._builders[constraint.kind](constraint)
        except (ValueError, TypeError) as exc:
            raise InvalidStructuredOutputError(f"{constraint.kind}: {exc}") from exc
        problem = LLMatcher.validate_grammar(grammar)
        if problem:
            raise InvalidStructuredOutputError(f"{constraint.kind}: {problem.strip()}")
        with self._lock:
            _put(self._grammars, constraint, grammar)
        return grammar

    def matcher(self, constraint: StructuredOutputs) -> Any:
        """A fresh matcher for one request (compiled once per constraint; blocking: call
        it off the event loop). Raises InvalidStructuredOutputError if it fails to build."""
        from llguidance import LLMatcher

        grammar = self.check(constraint)
        with self._lock:
            pristine = self._matchers.get(constraint)
            if pristine is not None:
                self._matchers.move_to_end(constraint)
                return pristine.deep_copy()
            tokenizer = self._tokenizer()
        pristine = LLMatcher(tokenizer, grammar, log_level=0)
        if pristine.is_error():
            raise InvalidStructuredOutputError(f"{constraint.kind}: {pristine.get_error()}")
        with self._lock:
            self.num_compiles += 1
            _put(self._matchers, constraint, pristine)
        return pristine.deep_copy()

    def is_compiled(self, constraint: StructuredOutputs) -> bool:
        """Whether :meth:`matcher` is a copy (microseconds) rather than a compile."""
        with self._lock:
            return constraint in self._matchers

    def state(self, constraint: StructuredOutputs) -> GrammarState:
        """A fresh grammar state for one request (blocking on a compile: see
        :meth:`matcher`)."""
        matcher = self.matcher(constraint)
        with self._lock:
            if self._executor is None:
                from llguidance import LLExecutor

                self._executor = LLExecutor()
            # The executor's mask width: ceil(vocab / 32) words (compute_bitmask() may pad
            # one more, always 0).
            num_words = (self._ll_tokenizer.vocab_size + 31) // 32
            return GrammarState(matcher, num_words, self._executor)

    def _tokenizer(self) -> Any:  # under the lock
        if self._ll_tokenizer is None:
            import llguidance.hf

            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, eos_token=self._eos_token_ids or None
            )
        return self._ll_tokenizer


def _put(cache: OrderedDict[StructuredOutputs, Any], key: StructuredOutputs, value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > MAX_CACHED:
        cache.popitem(last=False)

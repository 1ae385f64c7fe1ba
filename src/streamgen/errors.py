"""Typed errors raised by streamgen.

Users catch these classes, never a bare ``RuntimeError``:

* :class:`RequestError` (a ``ValueError``): the request itself is wrong
  (bad sampling parameters, empty or over-long prompt, bad token ids). It is
  raised before anything is queued.
* :class:`ModelLoadError`: a checkpoint cannot be loaded (unsupported
  architecture, missing tensor, unreadable files).
* :class:`CapacityError`: the engine cannot hold the request at all.
* :class:`EngineDeadError`: the engine's core has stopped; open streams end
  with it.
* :class:`EngineNotStartedError` (also a ``RuntimeError``): the engine was used
  before ``start()`` / ``async with``.
* :class:`BackendUnavailableError` (a :class:`ConfigError`): the chosen
  attention backend cannot run on this machine (package or GPU missing).
"""

from __future__ import annotations


class StreamgenError(Exception):
    """Base class of every error streamgen raises on purpose."""


class RequestError(StreamgenError, ValueError):
    """A request is invalid; raised before it is queued."""


class InvalidSamplingParamsError(RequestError):
    """A :class:`~streamgen.SamplingParams` field is out of range."""


class InvalidStructuredOutputError(InvalidSamplingParamsError):
    """A structured-output constraint (JSON schema, regex, grammar, choice) is invalid;
    the message names the problem (llguidance's own diagnostic for a bad grammar)."""


class InvalidPromptError(RequestError):
    """The prompt is empty, too long, or holds token ids outside the vocabulary."""


class ModelLoadError(StreamgenError):
    """A model checkpoint could not be loaded."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture is not one streamgen implements."""


class MissingTensorError(ModelLoadError):
    """A tensor the architecture needs is absent from the checkpoint."""


class ModelCacheError(ModelLoadError):
    """The local model cache could not be built or verified."""


class CapacityError(StreamgenError):
    """The request can never fit in the engine (context or KV pool too small)."""


class EngineDeadError(StreamgenError):
    """The engine's core thread has died; the engine no longer serves requests."""


class EngineNotStartedError(StreamgenError, RuntimeError):
    """The engine was asked to serve before ``await engine.start()`` (or ``async with``)."""


class WrongEventLoopError(StreamgenError, RuntimeError):
    """The engine was called from an event loop (or thread) other than the one it was
    started on: its streams live on that loop. Serve every app of an engine from the
    loop that started it (mount them in one ASGI app)."""


class ConfigError(StreamgenError, ValueError):
    """A configuration value (dtype, cache size, backend name...) is invalid."""


class BackendUnavailableError(ConfigError):
    """An attention backend cannot run here: its package, device or mode is missing.

    Raised when the backend is constructed (or, for a CPU tensor without the
    Triton interpreter, when it is first asked to plan a step).
    """

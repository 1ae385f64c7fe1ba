"""Every check a contributor needs: `nox -s tests`, `lint`, `typecheck`, `demo`, `bench`.

Each session builds its own virtualenv with the pinned CPU torch (override
with STREAMGEN_TORCH, e.g. STREAMGEN_TORCH="torch" on a CUDA machine), the
project, and the default model (converted once into $STREAMGEN_HOME).
"""

from __future__ import annotations

import os

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "tests"]

TORCH = os.environ.get("STREAMGEN_TORCH", "torch==2.13.0")


def _install(session: nox.Session, extras: str = "dev") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


def _fetch_default_model(session: nox.Session) -> None:
    session.run("python", "-m", "streamgen.checkpoint", "fetch")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (CPU), with the real default model for the end-to-end tests."""
    _install(session)
    _fetch_default_model(session)
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "property_tests", "bench", "examples")


@nox.session
def typecheck(session: nox.Session) -> None:
    _install(session)
    session.run("mypy", "src/streamgen")


@nox.session
def demo(session: nox.Session) -> None:
    """Stream a real answer from the default model."""
    _install(session, extras="dev")
    _fetch_default_model(session)
    session.run("python", "-m", "streamgen", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against the peers: `nox -s bench -- latency|throughput|prefix|spec|stream`.

    The `bench` extra builds llama-cpp-python from source (about 10 minutes on
    2 cores, once per virtualenv); if it does not build, the llama.cpp peer is
    skipped and everything else runs.
    """
    _install(session, extras="dev")
    env = {"CMAKE_ARGS": os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=ON")}
    try:
        session.install("-e", ".[dev,bench]", env=env)
    except nox.command.CommandFailed:
        session.warn("llama-cpp-python did not build: the llama.cpp peer will be skipped")
        session.install("matplotlib>=3.8", "accelerate>=1.0")
    _fetch_default_model(session)
    session.run("python", "-m", "bench", *(session.posargs or ["latency"]))

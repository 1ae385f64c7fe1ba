"""Hand a step's events from the core thread to the event loop, without blocking.

asyncio: ``loop.call_soon_threadsafe``; trio: the trio token's
``run_sync_soon``. Both queue a callback on the loop and return at once, so
the core thread never waits for the application.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import sniffio


def loop_scheduler() -> Callable[[Callable[..., Any], Any], None]:
    """For the running event loop: ``schedule(fn, arg)`` runs ``fn(arg)`` on it soon."""
    library = sniffio.current_async_library()
    if library == "asyncio":
        import asyncio

        loop = asyncio.get_running_loop()

        def schedule_asyncio(fn: Callable[..., Any], arg: Any) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(fn, arg)

        return schedule_asyncio
    if library == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()

        def schedule_trio(fn: Callable[..., Any], arg: Any) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(fn, arg)

        return schedule_trio
    raise RuntimeError(f"streamgen supports asyncio and trio, not {library!r}")


def current_loop() -> object | None:
    """The running event loop (asyncio) or run (trio token), None outside of one: what
    an engine compares to be sure it is called from the loop it started on."""
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None
    if library == "asyncio":
        import asyncio

        return asyncio.get_running_loop()
    if library == "trio":
        import trio

        return trio.lowlevel.current_trio_token()
    return None

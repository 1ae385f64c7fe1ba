"""`streamgen chat`: a conversation in the terminal, streamed, the history kept.

Ctrl-C while an answer streams cancels that answer (its KV blocks are freed) and keeps
the conversation; Ctrl-C at the prompt, or end of input (Ctrl-D), ends the program.
Input is read asynchronously (a pipe reader on stdin), so nothing blocks the event loop
the engine streams on.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any


async def chat(model: Any, config: Any, params: Any) -> int:
    from streamgen.engine.engine import Engine

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    history: list[dict[str, str]] = []
    async with Engine(model, config) as engine:
        answering: list[Any] = []  # the stream being answered, while there is one

        def on_sigint() -> None:
            if answering:
                answering[0].cancel()
            else:
                reader.feed_eof()  # at the prompt: end the conversation

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        try:
            while True:
                print("> ", end="", flush=True)
                line = (await reader.readline()).decode()
                if not line:
                    print()
                    return 0
                if not line.strip():
                    continue
                history.append({"role": "user", "content": line.strip()})
                stream = engine.stream(history, params)
                answering.append(stream)
                parts = []
                async for event in stream:
                    print(event.text, end="", flush=True)
                    parts.append(event.text)
                answering.clear()
                if stream.finish_reason == "abort":
                    print(" [cancelled]", flush=True)
                print()
                history.append({"role": "assistant", "content": "".join(parts)})
        finally:
            loop.remove_signal_handler(signal.SIGINT)

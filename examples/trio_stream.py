"""Two concurrent streams under trio, one of them cancelled after five tokens."""

import trio

from streamgen import Engine, SamplingParams


async def main() -> None:
    params = SamplingParams(temperature=0, max_tokens=40)
    async with Engine() as engine:

        async def answer(question: str, max_events: int | None = None) -> None:
            stream = engine.stream([{"role": "user", "content": question}], params)
            text = ""
            async for event in stream:
                text += event.text
                if max_events is not None and event.index + 1 == max_events:
                    stream.cancel()
            print(f"[{stream.finish_reason}] {question} -> {text!r}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, "Tell me the capital of France.")
            nursery.start_soon(answer, "Write a long poem about the sea.", 5)
        print(engine.stats())


trio.run(main)

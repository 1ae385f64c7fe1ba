"""Stream an answer from the default model (SmolLM2-135M-Instruct) with asyncio."""

import asyncio

from streamgen import Engine, SamplingParams


async def main() -> None:
    async with Engine() as engine:
        chat = [{"role": "user", "content": "Tell me the capital of France."}]
        async for event in engine.stream(chat, SamplingParams(temperature=0, max_tokens=48)):
            print(event.text, end="", flush=True)
        print()


asyncio.run(main())

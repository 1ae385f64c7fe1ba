"""Live reprioritisation and cancellation while requests run.

Three background essays fill the engine's two sequence slots; an urgent
question (priority 10) preempts one of them and is answered first; then one
essay is promoted with set_priority() and another is cancelled mid-stream.
"""

import asyncio

from streamgen import Engine, EngineConfig, SamplingParams


async def main() -> None:
    config = EngineConfig(max_num_seqs=2)
    essay = SamplingParams(temperature=0, max_tokens=60)
    async with Engine(None, config) as engine:
        order: list[str] = []

        started = {f"essay-{i}": asyncio.Event() for i in range(3)}

        async def run(name: str, question: str, params: SamplingParams, priority: int = 0):
            stream = engine.stream([{"role": "user", "content": question}], params, priority)
            pieces = []
            async for event in stream:
                pieces.append(event.text)
                if name in started:
                    started[name].set()
            text = "".join(pieces)
            order.append(name)
            print(f"[{name}, {stream.finish_reason}] {text[:60]!r}")
            return stream

        essays = [
            asyncio.create_task(run(f"essay-{i}", f"Write an essay about topic {i}.", essay))
            for i in range(3)
        ]
        await started["essay-0"].wait()  # both slots are busy with essays now
        await started["essay-1"].wait()
        await run("urgent", "What is 2 + 2?", SamplingParams(temperature=0, max_tokens=8), 10)
        stream_2 = engine.stream([{"role": "user", "content": "Describe the moon."}], essay)
        stream_2.set_priority(5)  # promoted while it runs
        async for event in stream_2:
            if event.index == 4:
                stream_2.cancel()  # live cancel: its KV blocks are freed at the next step
        print(f"[moon, {stream_2.finish_reason}]")
        await asyncio.gather(*essays)
        print("finished in order:", order)
        print("preemptions:", engine.stats()["preemptions"])


asyncio.run(main())

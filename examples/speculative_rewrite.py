"""Rewrite a text with n-gram speculative decoding and show what speculation did.

Input-grounded work (rewrite, correct, extract) copies long runs of the
prompt: the n-gram drafter proposes them and one forward verifies many
tokens. The output is exactly what plain greedy decoding gives.
"""

import asyncio

from streamgen import Engine, EngineConfig, SamplingParams, SpeculationConfig

TEXT = (
    "The council met on Tuesday to discuss the new library. Several residents "
    "spoke in favour of the plan, noting that the current building is too small "
    "for the children who attend the weekly reading programmes. The mayor said "
    "a decision would be made next month after a public survey."
)


async def main() -> None:
    config = EngineConfig(speculation=SpeculationConfig("ngram", max_nodes=12, max_depth=8))
    async with Engine(config=config) as engine:
        chat = [{"role": "user", "content": f"Repeat this text exactly:\n\n{TEXT}"}]
        stream = engine.stream(chat, SamplingParams(temperature=0, max_tokens=80))
        async for event in stream:
            print(event.text, end="", flush=True)
        spec = stream.metrics.speculation
        print(f"\n\ndraft tokens: {spec.draft_tokens}, accepted: {spec.accepted_tokens} "
              f"({spec.acceptance_rate:.0%}), tokens per step: {spec.mean_accepted_length:.2f}")


asyncio.run(main())

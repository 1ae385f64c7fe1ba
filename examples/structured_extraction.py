"""Extract a pydantic model from text with the SDK: the output is constrained to the
model's JSON schema, so it always parses.

    python examples/structured_extraction.py
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field

from streamgen import Engine, SamplingParams, StructuredOutputs

TEXT = (
    "Order #4411 was placed by Maria Lopez on 2026-11-28: two blue mugs and one teapot, "
    "to be shipped to Madrid."
)


class Order(BaseModel):
    order_id: int
    customer: str = Field(max_length=40)
    date: str = Field(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
    city: str = Field(max_length=30)
    items: list[str] = Field(min_length=1, max_length=5)


async def main() -> None:
    async with Engine() as engine:
        params = SamplingParams(
            temperature=0, max_tokens=200, structured_outputs=StructuredOutputs(json=Order)
        )
        messages = [{"role": "user", "content": f"Extract the order as JSON: {TEXT}"}]
        completion = await engine.generate(messages, params)
        order = Order.model_validate_json(completion.text)
        print(order)
        # A choice among labels, and a regex, the same way:
        label = await engine.generate(
            f"Is this a complaint or an order? {TEXT}\nAnswer:",
            SamplingParams(temperature=0, max_tokens=4,
                           structured_outputs=StructuredOutputs(choice=[" complaint", " order"])),
        )  # fmt: skip
        print("label:", label.text.strip())


if __name__ == "__main__":
    asyncio.run(main())

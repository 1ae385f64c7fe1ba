"""Structured outputs through the official `openai` client against `streamgen serve`:
`response_format` from a pydantic model (`chat.completions.parse`) and vLLM's
`structured_outputs` extra for a regex.

    python examples/openai_structured.py
"""

from __future__ import annotations

import openai
from openai_client import start_server
from pydantic import BaseModel, Field


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    famous_for: list[str] = Field(min_length=1, max_length=3)


def main() -> None:
    server, url = start_server()
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        completion = client.chat.completions.parse(
            model="smollm2", messages=[{"role": "user", "content": "Describe Paris."}],
            response_format=City, temperature=0, max_tokens=150,
        )  # fmt: skip
        print(completion.choices[0].message.parsed)
        date = client.completions.create(
            model="smollm2", prompt="The Eiffel tower opened on", max_tokens=12, temperature=0,
            extra_body={"structured_outputs": {"regex": " [0-9]{4}-[0-9]{2}-[0-9]{2}"}},
        )  # fmt: skip
        print("date:", date.choices[0].text.strip())
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()

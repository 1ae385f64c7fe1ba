"""The official `openai` client, sync and async, against `streamgen serve`.

    python examples/openai_client.py

Starts `streamgen serve` (the default model) on a free port, asks one question with the
sync client and streams another with the async one, then stops the server. Against a
server you run yourself: `streamgen serve --port 8000`, then
`openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")`.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import urllib.request

import openai


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "streamgen", "serve", "--port", str(port), "--max-model-len",
         "2048", "--served-model-name", "smollm2", "--log-level", "warning"],
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # the model loads in a few seconds
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    return server, url


async def stream_answer(url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
    stream = await client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Name three primary colors."}],
        max_tokens=40, temperature=0, stream=True,
    )  # fmt: skip
    async for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


def main() -> None:
    server, url = start_server()
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        question = [{"role": "user", "content": "Tell me the capital of France."}]
        answer = client.chat.completions.create(
            model="smollm2", messages=question, max_tokens=24, temperature=0
        )
        print(answer.choices[0].message.content)
        asyncio.run(stream_answer(url))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()

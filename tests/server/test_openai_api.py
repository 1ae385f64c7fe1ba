"""The OpenAI-compatible server against the official ``openai`` client (the reference for
every request and response shape: the client parses each body into its own types), on a
real uvicorn server serving the default model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import httpx
import openai
import pytest
from conftest import MODEL, LiveServer

from streamgen import SamplingParams

pytestmark = pytest.mark.real_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def sdk_generate(live: LiveServer, prompt: Any, params: SamplingParams) -> Any:
    """The same request through the SDK, on the server's own engine and event loop."""
    return asyncio.run_coroutine_threadsafe(live.engine.generate(prompt, params), live.loop).result(
        timeout=120
    )


def wait_until_idle(live: LiveServer) -> dict[str, Any]:
    """The engine's counters once nothing runs or waits (a bounded wait, not a timing)."""
    for _ in range(600):
        stats = live.engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"requests still in flight: {live.engine.stats()}")


def test_chat_completion_equals_the_sdk(live: LiveServer) -> None:
    response = live.client().chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0
    )
    expected = sdk_generate(live, QUESTION, SamplingParams(temperature=0, max_tokens=24))
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason == "length"
    prompt_ids = live.engine.tokenize(QUESTION)
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == len(expected.token_ids) == 24


def test_streamed_chat_has_role_first_finish_last_and_usage(live: LiveServer) -> None:
    chunks = list(live.client().chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    expected = sdk_generate(live, QUESTION, SamplingParams(temperature=0, max_tokens=12))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == expected.text
    assert [c.choices[0].finish_reason for c in body][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_n_choices_share_the_prompt_and_reproduce_with_a_seed(live: LiveServer) -> None:
    def sample() -> list[str]:
        response = live.client().chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=16,
            temperature=1.0,
            seed=7,
            n=3,
            extra_body={"ignore_eos": True},
        )
        assert [c.index for c in response.choices] == [0, 1, 2]
        assert response.usage is not None and response.usage.completion_tokens == 48
        return [c.message.content or "" for c in response.choices]

    first = sample()
    assert sample() == first  # seeded: the same three samples again
    assert len(set(first)) > 1  # each choice has a seed of its own
    alone = sdk_generate(
        live, QUESTION, SamplingParams(temperature=1.0, max_tokens=16, seed=7, ignore_eos=True)
    )
    assert first[0] == alone.text  # choice 0 takes the request's seed


def test_streamed_choices_interleave_with_their_indices(live: LiveServer) -> None:
    chunks = list(live.client().chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=8, temperature=1.0, seed=3, n=2, stream=True
    ))  # fmt: skip
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "length", 1: "length"}
    response = live.client().chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=8, temperature=1.0, seed=3, n=2
    )
    assert [c.message.content for c in response.choices] == [texts[0], texts[1]]


def test_chat_logprobs_are_the_sampled_distribution(live: LiveServer) -> None:
    response = live.client().chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    content = response.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the top token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes) == entry.token.encode()
    assert "".join(e.token for e in content) == response.choices[0].message.content


def test_completions_text_token_ids_and_several_prompts(live: LiveServer) -> None:
    client = live.client()
    text = "The capital of France is"
    ids = live.engine.tokenizer.encode(text)
    by_text = client.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == by_ids.choices[0].text
    expected = sdk_generate(live, ids, SamplingParams(temperature=0, max_tokens=8))
    assert by_text.choices[0].text == expected.text
    several = client.completions.create(
        model=MODEL, prompt=[text, "Two plus two is"], max_tokens=4, temperature=0, n=2
    )
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert (
        several.choices[0].text
        == several.choices[1].text
        == expected.text[: len(several.choices[0].text)]
    )
    assert several.usage is not None
    assert several.usage.prompt_tokens == len(ids) + len(
        live.engine.tokenizer.encode("Two plus two is")
    )


def test_completions_echo_and_legacy_logprobs(live: LiveServer) -> None:
    client = live.client()
    text = "The capital of France is"
    echoed = client.completions.create(
        model=MODEL, prompt=text, max_tokens=5, temperature=0, echo=True
    )
    plain = client.completions.create(
        model=MODEL, prompt=text, max_tokens=5, temperature=0, logprobs=2
    )
    assert echoed.choices[0].text == text + plain.choices[0].text
    lp = plain.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == 5
    assert "".join(lp.tokens) == plain.choices[0].text
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets
    for token, top in zip(lp.tokens, lp.top_logprobs, strict=True):
        assert max(top, key=top.get) == token and len(top) <= 2


def test_streamed_completion_equals_the_whole_one(live: LiveServer) -> None:
    client = live.client()
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_penalties_and_extras(live: LiveServer) -> None:
    client = live.client()
    base = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0
    )
    text = base.choices[0].message.content or ""
    cut = text.split(" ")[2] if len(text.split(" ")) > 3 else text[-3:]
    stopped = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stop=[cut, "zzzz"]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(cut)]
    extras = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=5, temperature=0,
        extra_body={"top_k": 1, "min_tokens": 5, "ignore_eos": True, "priority": 2,
                    "repetition_penalty": 1.0},
    )  # fmt: skip
    assert extras.usage is not None and extras.usage.completion_tokens == 5


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": QUESTION, "temperature": -1}, "temperature"),
        ({"messages": QUESTION, "top_p": 0}, "top_p"),
        ({"messages": QUESTION, "n": 0}, "n"),
        ({"messages": QUESTION, "max_tokens": "many"}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages.0.role"),
        ({"messages": QUESTION, "top_logprobs": 3}, "top_logprobs"),
        ({"messages": QUESTION, "logprobs": True, "top_logprobs": 99}, "logprobs"),
        ({"messages": QUESTION, "stop": [""]}, None),
        ({"messages": [{"role": "user", "content": "x" * 20000}]}, None),  # over the context
    ],
)
def test_bad_chat_requests_are_400s_in_openai_shape(
    live: LiveServer, body: dict[str, Any], param: str | None
) -> None:
    before = live.engine.stats()
    response = httpx.post(
        f"{live.url}/v1/chat/completions", json={"model": MODEL, **body}, timeout=60
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param
    after = wait_until_idle(live)
    assert after["kv_blocks_used"] == before["kv_blocks_used"]  # nothing reached the core


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", "ü".encode("latin-1")])
def test_bodies_that_are_not_json_objects_are_400s(live: LiveServer, raw: bytes) -> None:
    response = httpx.post(
        f"{live.url}/v1/completions", content=raw,
        headers={"content-type": "application/json"}, timeout=30,
    )  # fmt: skip
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_raises_typed_errors(live: LiveServer) -> None:
    client = live.client()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[10**9], max_tokens=2)  # outside vocab
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-5", messages=QUESTION)
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_models_health_tokenize_detokenize(live: LiveServer) -> None:
    models = live.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{live.url}/health").status_code == 200
    text = "Hello, world! 123"
    tokens = httpx.post(f"{live.url}/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert tokens["tokens"] == live.engine.tokenizer.encode(text)
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 1024
    chat = httpx.post(f"{live.url}/tokenize", json={"messages": QUESTION}).json()
    assert chat["tokens"] == live.engine.tokenize(QUESTION)
    back = httpx.post(f"{live.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back == {"prompt": text}
    bad = httpx.post(f"{live.url}/detokenize", json={"tokens": [-1]})
    assert bad.status_code == 400


def test_tokenizer_info_serves_a_remote_tokenizer(live: LiveServer) -> None:
    """What lm-evaluation-harness's remote tokenizer reads: special tokens and the chat
    template from ``/tokenizer_info``, their ids through ``/tokenize``."""
    tokenizer = live.engine.tokenizer
    info = httpx.get(f"{live.url}/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["chat_template"] == tokenizer.chat_template and info["model_max_length"] == 1024
    body = {"prompt": info["eos_token"], "add_special_tokens": False}
    eos = httpx.post(f"{live.url}/tokenize", json=body).json()["tokens"]
    assert eos == [tokenizer.eos_token_id]


def test_metrics_count_requests_and_tokens(live: LiveServer) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def samples() -> dict[str, float]:
        text = httpx.get(f"{live.url}/metrics").text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = s.name + json.dumps(s.labels, sort_keys=True) if s.labels else s.name
                out[key] = s.value
        return out

    before = samples()
    live.client().chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=7, temperature=0
    )
    after = samples()
    length = 'streamgen_requests_total{"finish_reason": "length"}'
    assert after[length] - before.get(length, 0.0) == 1
    assert (
        after["streamgen_generation_tokens_total"] - before["streamgen_generation_tokens_total"]
        == 7
    )
    assert after["streamgen_time_to_first_token_seconds_count"] >= 1
    assert (
        after["streamgen_inter_token_latency_seconds_count"]
        - before.get("streamgen_inter_token_latency_seconds_count", 0.0)
        == 6
    )
    assert after["streamgen_kv_blocks_total"] > 0 and "streamgen_requests_waiting" in after


def test_a_client_that_disconnects_cancels_its_request(live: LiveServer) -> None:
    baseline = wait_until_idle(live)
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 900, "stream": True,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]  # a few events, then hang up
    assert all(line.startswith("data: ") or not line for line in received)
    after = wait_until_idle(live)
    assert after["kv_blocks_used"] == baseline["kv_blocks_used"]
    assert after["generated_tokens"] - baseline["generated_tokens"] < 900


def test_past_max_concurrency_is_a_429(live: LiveServer) -> None:
    """The app mounted at /limited allows one generation in flight."""
    url = f"{live.url}/limited"
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 400, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as held:
        lines = held.iter_lines()  # kept: dropping the iterator closes the connection
        next(lines)  # the first request is streaming
        second = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False})
        assert second.status_code == 429
        assert second.json()["error"]["type"] == "rate_limit_error"
    wait_until_idle(live)
    after = httpx.post(
        f"{url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}
    )
    assert after.status_code == 200  # the slot is free again once the first one ended


def test_mounted_in_a_fastapi_app(live: LiveServer) -> None:
    """A FastAPI app with the API mounted at /host/llm keeps its own routes."""
    assert httpx.get(f"{live.url}/host/ping").json() == {"pong": "yes"}
    response = live.client("/host/llm").chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=4, temperature=0
    )
    assert response.usage is not None and response.usage.completion_tokens == 4


def test_the_engine_refuses_a_foreign_event_loop(live: LiveServer) -> None:
    from streamgen import WrongEventLoopError

    async def elsewhere() -> None:
        live.engine.stream("Hello")

    with pytest.raises(WrongEventLoopError):
        asyncio.run(elsewhere())


def test_streamgen_serve_runs_the_standalone_app(default_model_dir: Any) -> None:
    import subprocess
    import sys

    from conftest import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamgen", "serve", "--port", str(port), "--max-model-len",
         "512", "--kv-cache-mb", "64", "--served-model-name", "smol", "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # bounded wait for start-up (model load)
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, "streamgen serve exited"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        response = client.chat.completions.create(
            model="smol", messages=QUESTION, max_tokens=3, temperature=0
        )
        assert response.usage is not None and response.usage.completion_tokens == 3
    finally:
        proc.terminate()  # uvicorn shuts down (the lifespan closes the engine), then
        _, stderr = proc.communicate(timeout=60)  # re-raises SIGTERM: the exit code is -15
        assert "Traceback" not in stderr, stderr


def test_logit_bias_bans_and_forces_tokens(live: LiveServer) -> None:
    client = live.client()
    plain = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=1
    )
    first = plain.choices[0].logprobs.tokens[0]
    first_id = live.engine.tokenizer.encode(first)
    assert len(first_id) == 1
    banned = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
        logit_bias={str(first_id[0]): -100},
    )  # fmt: skip
    assert not banned.choices[0].text.startswith(first)
    forced_id = live.engine.tokenizer.encode(" banana")[0]
    forced = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0.8, seed=1,
        logit_bias={str(forced_id): 100},
    )  # fmt: skip
    assert forced.choices[0].text == live.engine.tokenizer.decode([forced_id] * 3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, logit_bias={str(10**7): 1})


def test_a_client_that_stops_reading_pauses_only_its_own_request(live: LiveServer) -> None:
    """At the ASGI boundary (a real socket's buffers would hold thousands of events): a
    ``send`` that stops returning after 3 events is a client whose socket is full. The
    held request stops within its stream buffer (16 tokens) plus the events in hand,
    while another request runs to its end; cancelling the held one frees its blocks."""
    import json as json_module

    from streamgen.server import openai_app

    app = openai_app(live.engine, model_name=MODEL)
    body = json_module.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 500,
                              "stream": True, "ignore_eos": True}).encode()  # fmt: skip

    async def scenario() -> tuple[int, int, int]:
        never = asyncio.Event()
        sent = 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal sent
            if message["type"] == "http.response.body":
                sent += 1
                if sent > 3:
                    await never.wait()

        requests = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if requests:
                return requests.pop()
            await never.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json")], "scheme": "http",
                 "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
                 "http_version": "1.1", "asgi": {"version": "3.0"}}  # fmt: skip
        before = live.engine.stats()["generated_tokens"]
        held = asyncio.ensure_future(app(scope, receive, send))
        other = await live.engine.generate(
            QUESTION, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        )
        for _ in range(20):  # a few more steps: the held request stays paused
            await asyncio.sleep(0.01)
        held_tokens = live.engine.stats()["generated_tokens"] - before - len(other.token_ids)
        running = live.engine.stats()["running"]
        held.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await held
        return len(other.token_ids), held_tokens, running

    other, held_tokens, running = asyncio.run_coroutine_threadsafe(scenario(), live.loop).result(
        timeout=300
    )
    assert other == 64
    assert 3 <= held_tokens <= 3 + 2 + 16 + 2  # sent, in hand, buffered, in the last steps
    assert running == 1  # paused, not finished
    assert wait_until_idle(live)["kv_blocks_used"] == 0


def test_echo_with_logprobs_scores_the_prompt(live: LiveServer) -> None:
    """lm-evaluation-harness's loglikelihood request: echo + logprobs + max_tokens=1. The
    prompt's tokens come back with the logprob of each given those before it (None for
    the first), equal to the SDK's prompt logprobs; streamed the same."""
    client = live.client()
    text = "The capital of France is Paris"
    ids = live.engine.tokenizer.encode(text)
    kwargs = dict(model=MODEL, prompt=text, max_tokens=1, temperature=0, echo=True, logprobs=2)
    response = client.completions.create(**kwargs)
    lp = response.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)

    async def sdk() -> Any:
        stream = live.engine.stream(ids, params)
        async for _ in stream:
            pass
        return stream.prompt_logprobs

    expected = asyncio.run_coroutine_threadsafe(sdk(), live.loop).result(timeout=120)
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx([e[0] for e in expected], abs=1e-6)
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert response.choices[0].text.startswith(text)
    streamed = list(client.completions.create(**kwargs, stream=True))
    first = streamed[0].choices[0]
    assert first.text == text and first.logprobs is not None
    assert first.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1 : len(ids)])


def test_n_choices_share_the_prompts_blocks(live: LiveServer) -> None:
    """n=4 over a ~300-token prompt: the other choices fork the first one's prompt
    blocks, so the prompt's full blocks are held once, not four times."""
    forks = wait_until_idle(live)["forks"]
    long = [{"role": "user", "content": " ".join(f"item{i}" for i in range(120))}]
    prompt_blocks = len(live.engine.tokenize(long)) // 16
    assert prompt_blocks >= 15
    body = {"model": MODEL, "messages": long, "max_tokens": 64, "n": 4, "stream": True,
            "ignore_eos": True, "temperature": 1.0, "seed": 5}  # fmt: skip
    seen: set[int] = set()
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        for line in lines:
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    seen.add(choice["index"])
            if len(seen) == 4:  # every choice is decoding: count the blocks held now
                used = live.engine.stats()["kv_blocks_used"]
                break
        for _ in lines:
            pass
    assert seen == {0, 1, 2, 3}
    # shared: the prompt's full blocks once, plus a few blocks per choice (its partial
    # last block, what it generated so far); unshared it would be 4 x prompt_blocks
    assert used <= prompt_blocks + 4 * 5 < 4 * prompt_blocks
    assert wait_until_idle(live)["forks"] == forks + 3

"""Command line: `streamgen demo [question]`, `fetch`, `serve` (the OpenAI API), `chat`."""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_QUESTION = "Explain in three sentences why the sky is blue."


def _demo(args: argparse.Namespace) -> int:
    import torch

    from streamgen.checkpoint.loader import load_model
    from streamgen.offline import OfflineGenerator
    from streamgen.sampling_params import SamplingParams

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype)
    messages = [{"role": "user", "content": args.question}]
    prompt_ids = loaded.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
    generator = OfflineGenerator(loaded)
    print(f"> {args.question}\n", flush=True)
    output_ids: list[int] = []
    printed = ""
    start = time.perf_counter()
    for token_id in generator.stream(prompt_ids, params):
        output_ids.append(token_id)
        text = loaded.tokenizer.decode(output_ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    elapsed = time.perf_counter() - start
    rate = len(output_ids) / elapsed
    print(f"\n\n[{len(output_ids)} tokens in {elapsed:.2f}s, {rate:.1f} tok/s]")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from streamgen.checkpoint import default_model_path

    print(default_model_path(progress=True))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from streamgen.engine.config import EngineConfig
    from streamgen.server import standalone_app

    speculation = None
    if args.speculation:
        import json

        from streamgen.spec.config import SpeculationConfig

        text = args.speculation.strip()
        fields = json.loads(text) if text.startswith("{") else {"method": text}
        speculation = SpeculationConfig(**fields)
    config = EngineConfig(
        dtype=args.dtype,
        quantization=None if args.quantization == "none" else args.quantization,
        threads=args.threads,
        max_model_len=args.max_model_len,
        kv_cache_bytes=args.kv_cache_mb << 20,
        speculation=speculation,
    )
    app = standalone_app(
        args.model, config, model_name=args.served_model_name, max_concurrency=args.max_concurrency
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _chat(args: argparse.Namespace) -> int:
    import asyncio

    from streamgen.chat_cli import chat
    from streamgen.engine.config import EngineConfig
    from streamgen.sampling_params import SamplingParams

    config = EngineConfig(threads=args.threads, max_model_len=args.max_model_len)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    return asyncio.run(chat(args.model, config, params))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamgen")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="stream an answer from a model (default: SmolLM2-135M)")
    demo.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    demo.add_argument("--model", default=None, help="HF checkpoint dir (default model if omitted)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    demo.add_argument("--max-tokens", type=int, default=200)
    demo.add_argument("--temperature", type=float, default=0.0)
    demo.add_argument("--threads", type=int, default=2)
    demo.set_defaults(func=_demo)
    fetch = sub.add_parser("fetch", help="download and convert the default model into the cache")
    fetch.set_defaults(func=_fetch)
    serve = sub.add_parser("serve", help="serve the OpenAI API (default model if no --model)")
    serve.add_argument("--model", default=None, help="checkpoint dir or GGUF file")
    serve.add_argument("--served-model-name", default=None, help="the id clients pass as model")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--threads", type=int, default=None)
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    serve.add_argument(
        "--quantization", default="auto",
        help="auto (a GGUF's own types), none (dense), q8_0, q4_0, q4_k, ... (quantize at load)",
    )  # fmt: skip
    serve.add_argument(
        "--speculation", default=None,
        help="ngram | self | a SpeculationConfig as JSON ('{\"method\": \"ngram\"}')",
    )  # fmt: skip
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--kv-cache-mb", type=int, default=512)
    serve.add_argument(
        "--max-concurrency", type=int, default=None, help="requests in flight past which: 429"
    )
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)
    chat = sub.add_parser("chat", help="a conversation in the terminal (Ctrl-C stops an answer)")
    chat.add_argument("--model", default=None, help="checkpoint dir or GGUF file")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--max-tokens", type=int, default=512)
    chat.add_argument("--threads", type=int, default=None)
    chat.add_argument("--max-model-len", type=int, default=4096)
    chat.set_defaults(func=_chat)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())

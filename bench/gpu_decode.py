"""GPU decode benchmark: streamgen with and without CUDA graphs, against HF and the roofline.

One run, one random-weight model with Llama-3.2-1B's shapes (bf16, built on
the device from a hand-written config: no download), measured four ways:

* streamgen decode tokens/s at batch 1, 8, 64, CUDA graphs on and off
  (:class:`~streamgen.runner.ModelRunner` steps: host prep + forward + sampler);
* HF transformers ``generate`` on the same weights (PyTorch eager mode, SDPA
  attention, dynamic cache, one static batch): decode time is
  ``t(1 + steps tokens) - t(1 token)``;
* the memory roofline of each decode step: (weights + KV bytes it reads) over
  the device's measured copy bandwidth;
* the attention kernel alone: Triton paged decode vs flash-attn's paged decode
  (when ``flash_attn`` imports) or else torch SDPA over a dense KV copy.

::

    python -m bench.gpu_decode --out bench/results/gpu_decode.json      # on a GPU
    python -m bench.gpu_decode --device cpu --tiny --out /tmp/smoke.json # CPU smoke run

On the CPU (``--tiny``) graphs are off and the Triton kernels run under the
interpreter: the numbers mean nothing, the code paths are exercised.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What one run measures. ``tiny``: a toy model and short runs (CPU smoke)."""

    device: str
    tiny: bool = False
    batch_sizes: tuple[int, ...] = (1, 8, 64)
    prompt_len: int = 128
    decode_steps: int = 64
    warmup_steps: int = 8
    attention_contexts: tuple[int, ...] = (1024, 4096)
    attention_iters: int = 50
    backend: str | None = None  # None: triton on CUDA, torch on the CPU
    run_hf: bool = True
    repeats: int = 3  # HF generate runs per measurement (the fastest counts)
    seed: int = 0

    @classmethod
    def for_device(cls, device: str, tiny: bool, **overrides: Any) -> BenchConfig:
        if not tiny:
            return cls(device=device, **overrides)
        short = dict(prompt_len=16, decode_steps=6, warmup_steps=1, attention_contexts=(40,),
                     attention_iters=1, repeats=1)  # fmt: skip
        return cls(device=device, tiny=True, **{**short, **overrides})

    @property
    def max_model_len(self) -> int:
        """Context the graphs are planned for: the longest sequence of the run, in blocks."""
        return 16 * math.ceil((self.prompt_len + self.warmup_steps + self.decode_steps + 1) / 16)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.startswith("cuda") else torch.float32


def llama_3_2_1b_config(tiny: bool = False) -> Any:
    """Llama-3.2-1B's architecture as an HF ``LlamaConfig`` (``tiny``: same family, toy sizes).

    >>> llama_3_2_1b_config().num_hidden_layers, llama_3_2_1b_config(tiny=True).hidden_size
    (16, 64)
    """
    from transformers import LlamaConfig

    sizes: dict[str, Any] = dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
    )
    if tiny:
        sizes = dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
    return LlamaConfig(
        **sizes, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_theta=500000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )  # fmt: skip


def build_models(cfg: BenchConfig, workdir: Path) -> tuple[Any, Any]:
    """(HF model, streamgen LoadedModel) sharing random weights: N(0, 0.02) matrices,
    1 + N(0, 0.02) norms. The HF model is saved as safetensors and loaded back."""
    from transformers import AutoModelForCausalLM

    from streamgen.checkpoint.loader import load_model

    config = llama_3_2_1b_config(cfg.tiny)
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    with torch.device(cfg.device):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=cfg.dtype,
                                                    attn_implementation="sdpa")  # fmt: skip
    hf_model.eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.02, generator=generator)
    hf_model.save_pretrained(workdir, safe_serialization=True)
    loaded = load_model(workdir, dtype=cfg.dtype, device=cfg.device, load_tokenizer=False)
    return hf_model, loaded


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], object], repeats: int = 1) -> float:
    """Mean seconds of ``fn()`` over ``repeats`` calls, device work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


# ----- streamgen and HF decode --------------------------------------------------------------


def streamgen_decode(loaded: Any, cfg: BenchConfig, batch_size: int, graphs: bool) -> dict:
    """Prefill ``batch_size`` random prompts, then time ``decode_steps`` greedy decode steps."""
    from streamgen.runner.batch import ModelBatch, SamplingRequest, SequenceChunk
    from streamgen.runner.cuda_graph import CudaGraphConfig
    from streamgen.runner.kv_cache import KVCacheConfig
    from streamgen.runner.model_runner import ModelRunner
    from streamgen.sampling_params import SamplingParams

    blocks_per_seq = cfg.max_model_len // 16
    graph_config = CudaGraphConfig(batch_size, cfg.max_model_len) if graphs else None
    runner = ModelRunner(
        loaded,
        KVCacheConfig(num_blocks=batch_size * blocks_per_seq + int(graphs)),
        backend=cfg.backend or ("triton" if cfg.device.startswith("cuda") else "torch"),
        cuda_graphs=graph_config,
    )
    greedy = SamplingRequest(SamplingParams(temperature=0.0), (), ())
    generator = torch.Generator().manual_seed(cfg.seed + batch_size)
    vocab = loaded.spec.vocab_size
    prompts = torch.randint(3, vocab, (batch_size, cfg.prompt_len), generator=generator).tolist()
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch_size)]
    runner.execute(ModelBatch([
        SequenceChunk(f"r{i}", prompt, 0, table, greedy)
        for i, (prompt, table) in enumerate(zip(prompts, tables, strict=True))
    ]))  # fmt: skip
    tokens, position = [3] * batch_size, cfg.prompt_len

    def step() -> None:
        nonlocal tokens, position
        batch = ModelBatch([
            SequenceChunk(f"r{i}", [token], position, table, greedy)
            for i, (token, table) in enumerate(zip(tokens, tables, strict=True))
        ])  # fmt: skip
        tokens, position = runner.execute(batch).token_ids, position + 1

    for _ in range(cfg.warmup_steps):
        step()
    seconds = timed(cfg.device, step, cfg.decode_steps)
    return {"system": "streamgen", "batch": batch_size, "cuda_graphs": runner.graphs is not None,
            "step_ms": 1e3 * seconds, "tokens_per_s": batch_size / seconds}  # fmt: skip


def hf_decode(hf_model: Any, cfg: BenchConfig, batch_size: int) -> dict:
    """HF ``generate`` (greedy, one static batch): decode tokens/s without the prefill."""
    generator = torch.Generator().manual_seed(cfg.seed + batch_size)
    vocab = hf_model.config.vocab_size
    input_ids = torch.randint(3, vocab, (batch_size, cfg.prompt_len), generator=generator)
    input_ids = input_ids.to(cfg.device)
    mask = torch.ones_like(input_ids)

    def generate(new_tokens: int) -> Callable[[], object]:
        return lambda: hf_model.generate(
            input_ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip

    with torch.inference_mode():
        generate(1 + cfg.warmup_steps)()
        prefill_only = min(timed(cfg.device, generate(1)) for _ in range(cfg.repeats))
        with_decode = min(
            timed(cfg.device, generate(1 + cfg.decode_steps)) for _ in range(cfg.repeats)
        )
    seconds = max(with_decode - prefill_only, 1e-9) / cfg.decode_steps
    return {"system": "hf_generate", "batch": batch_size, "cuda_graphs": False,
            "step_ms": 1e3 * seconds, "tokens_per_s": batch_size / seconds}  # fmt: skip


# ----- roofline ------------------------------------------------------------------------------


def copy_bandwidth(device: str, size_bytes: int, repeats: int = 5) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.ones(size_bytes, dtype=torch.uint8, device=device)  # [size_bytes]
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = timed(device, lambda: dst.copy_(src), repeats)
    return 2 * size_bytes / seconds


def decode_step_bytes(spec: Any, dtype: torch.dtype, batch_size: int, context: int) -> int:
    """Bytes one decode step must read: every layer weight, the final norm and the LM head
    (the embedding table only for the batch's rows), plus each sequence's K/V."""
    elem = torch.empty((), dtype=dtype).element_size()
    hidden = spec.hidden_size
    per_layer = (hidden * (spec.q_size + 2 * spec.kv_size) + spec.q_size * hidden
                 + 3 * hidden * spec.intermediate_size + 2 * hidden)  # fmt: skip
    weights = spec.num_layers * per_layer + hidden * (spec.vocab_size + 1)
    kv = batch_size * context * spec.num_layers * 2 * spec.kv_size
    return elem * (weights + kv)


# ----- attention kernels ---------------------------------------------------------------------


def attention_kernels(spec: Any, cfg: BenchConfig, batch_size: int, context: int) -> dict:
    """Microseconds per decode-attention call (one layer): Triton vs the peer."""
    from streamgen.kernels.common import KERNELS_INTERPRETED

    device, dtype = cfg.device, cfg.dtype
    heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    scale = dim**-0.5
    generator = torch.Generator().manual_seed(cfg.seed)
    query = torch.randn(batch_size, heads, dim, generator=generator).to(device, dtype)  # [B, H, D]
    keys = torch.randn(batch_size, context, kv_heads, dim, generator=generator).to(device, dtype)
    values = torch.randn_like(keys)  # [B, context, kv_heads, D]
    seq_lens = torch.full((batch_size,), context, dtype=torch.int32, device=device)  # [B]
    result: dict[str, Any] = {"batch": batch_size, "context": context,
                              "kv_bytes": 2 * keys.numel() * keys.element_size()}  # fmt: skip

    def paged(block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # [num_blocks, block_size, kv_heads, D] x2 and [B, blocks_per_seq] int32, shuffled blocks
        blocks_per_seq = math.ceil(context / block_size)
        order = torch.randperm(batch_size * blocks_per_seq, generator=generator)
        tables = order.view(batch_size, blocks_per_seq).to(device=device, dtype=torch.int32)
        k_cache = torch.zeros(batch_size * blocks_per_seq, block_size, kv_heads, dim,
                              dtype=dtype, device=device)  # fmt: skip
        v_cache = torch.zeros_like(k_cache)
        padded = blocks_per_seq * block_size
        for cache, dense in ((k_cache, keys), (v_cache, values)):
            full = torch.zeros(batch_size, padded, kv_heads, dim, dtype=dtype, device=device)
            full[:, :context] = dense
            cache[tables.long().flatten()] = full.view(-1, block_size, kv_heads, dim)
        return k_cache, v_cache, tables

    if device.startswith("cuda") or KERNELS_INTERPRETED:
        from streamgen.kernels.paged_decode import paged_decode_attention

        k_cache, v_cache, tables = paged(16)
        result["triton_us"] = 1e6 * _warm_timed(device, cfg.attention_iters, lambda: (
            paged_decode_attention(query, k_cache, v_cache, tables, seq_lens, scale,
                                   max_seq_len=context)))  # fmt: skip
    flash = _flash_attn_with_kvcache() if device.startswith("cuda") else None
    if flash is not None:
        k_cache, v_cache, tables = paged(256)  # flash-attn 2 pages are multiples of 256
        result["peer"] = "flash_attn paged"
        result["peer_us"] = 1e6 * _warm_timed(device, cfg.attention_iters, lambda: flash(
            query.unsqueeze(1), k_cache, v_cache, cache_seqlens=seq_lens, block_table=tables,
            softmax_scale=scale, causal=True))  # fmt: skip
    else:
        dense_q = query.unsqueeze(2)  # [B, H, 1, D]
        dense_k, dense_v = keys.transpose(1, 2), values.transpose(1, 2)  # [B, kv_heads, ctx, D]
        result["peer"] = "torch sdpa (dense KV)"
        result["peer_us"] = 1e6 * _warm_timed(device, cfg.attention_iters, lambda: (
            torch.nn.functional.scaled_dot_product_attention(
                dense_q, dense_k, dense_v, scale=scale, enable_gqa=True)))  # fmt: skip
    return result


def _warm_timed(device: str, iters: int, fn: Callable[[], object]) -> float:
    fn()
    return timed(device, fn, iters)


def _flash_attn_with_kvcache() -> Callable[..., Any] | None:
    try:
        from flash_attn import flash_attn_with_kvcache
    except (ImportError, OSError):
        return None
    return flash_attn_with_kvcache


# ----- the run -------------------------------------------------------------------------------


def run_benchmark(cfg: BenchConfig) -> dict:
    """Every measurement of one run, as a JSON-ready record."""
    if not cfg.device.startswith("cuda"):
        # Before streamgen.kernels is imported: the Triton kernels then run interpreted.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="gpu-decode-") as workdir:
        hf_model, loaded = build_models(cfg, Path(workdir))
    spec = loaded.spec
    use_graphs = (False, True) if cfg.device.startswith("cuda") else (False,)
    decode = []
    for batch_size in cfg.batch_sizes:
        for graphs in use_graphs:
            decode.append(streamgen_decode(loaded, cfg, batch_size, graphs))
            if cfg.device.startswith("cuda"):
                torch.cuda.empty_cache()  # the runner's KV pool and graphs are gone
    if cfg.run_hf:
        decode += [hf_decode(hf_model, cfg, b) for b in cfg.batch_sizes]
    bandwidth = copy_bandwidth(cfg.device, GIB if cfg.device.startswith("cuda") else 32 << 20)
    mean_context = cfg.prompt_len + cfg.warmup_steps + cfg.decode_steps // 2
    for row in decode:
        step_bytes = decode_step_bytes(spec, cfg.dtype, row["batch"], mean_context)
        row["roofline_tokens_per_s"] = row["batch"] * bandwidth / step_bytes
        row["roofline_fraction"] = row["tokens_per_s"] / row["roofline_tokens_per_s"]
    attention = [attention_kernels(spec, cfg, b, c)
                 for b in cfg.batch_sizes for c in cfg.attention_contexts]  # fmt: skip
    return {
        "scenario": "gpu_decode",
        "device": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu",
        "config": {**asdict(cfg), "dtype": str(cfg.dtype), "max_model_len": cfg.max_model_len},
        "model": {
            "shape": "tiny" if cfg.tiny else "Llama-3.2-1B",
            "weights": "random N(0, 0.02)",
            "hidden": spec.hidden_size,
            "layers": spec.num_layers,
            "vocab": spec.vocab_size,
        },
        "copy_bandwidth_bytes_per_s": bandwidth,
        "decode": decode,
        "attention": attention,
    }


def format_table(record: dict) -> str:
    """The record as two plain-text tables."""
    lines = [f"decode on {record['device']} ({record['model']['shape']}, "
             f"{record['config']['dtype']}), copy bandwidth "
             f"{record['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s",
             f"{'system':<12}{'batch':>6}{'graphs':>8}{'ms/step':>10}{'tok/s':>11}"
             f"{'roofline':>11}{'of roof':>9}"]  # fmt: skip
    for row in record["decode"]:
        lines.append(
            f"{row['system']:<12}{row['batch']:>6}{('on' if row['cuda_graphs'] else 'off'):>8}"
            f"{row['step_ms']:>10.2f}{row['tokens_per_s']:>11.1f}"
            f"{row['roofline_tokens_per_s']:>11.1f}{100 * row['roofline_fraction']:>8.1f}%"
        )
    lines.append("")
    lines.append(
        f"{'attention':<12}{'batch':>6}{'context':>9}{'triton us':>11}{'peer us':>10}  peer"
    )
    for row in record["attention"]:
        triton_us = row.get("triton_us")
        shown = f"{triton_us:>11.1f}" if triton_us is not None else f"{'-':>11}"
        lines.append(f"{'decode':<12}{row['batch']:>6}{row['context']:>9}{shown}"
                     f"{row['peer_us']:>10.1f}  {row['peer']}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> tuple[BenchConfig, Path | None]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_decode",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy model and short runs (smoke)")
    parser.add_argument("--out", type=Path, help="write the JSON record here")
    parser.add_argument("--batch-sizes", default="1,8,64")
    parser.add_argument("--steps", type=int, help="timed decode steps")
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--contexts", help="attention microbenchmark contexts, e.g. 1024,4096")
    parser.add_argument("--backend", help="streamgen attention backend for eager steps")
    parser.add_argument("--skip-hf", action="store_true", help="do not run HF generate")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        "batch_sizes": tuple(int(b) for b in args.batch_sizes.split(",")),
        "backend": args.backend,
        "run_hf": not args.skip_hf,
    }
    if args.steps is not None:
        overrides["decode_steps"] = args.steps
    if args.prompt_len is not None:
        overrides["prompt_len"] = args.prompt_len
    if args.contexts:
        overrides["attention_contexts"] = tuple(int(c) for c in args.contexts.split(","))
    return BenchConfig.for_device(args.device, args.tiny, **overrides), args.out


def main(argv: Sequence[str] | None = None) -> dict:
    cfg, out = parse_args(argv)
    record = run_benchmark(cfg)
    print(format_table(record))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2))
        print(f"\nwrote {out}")
    return record


if __name__ == "__main__":
    main()

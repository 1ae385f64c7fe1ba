"""Compile every kernel for an NVIDIA GPU (sm_90) on a machine without one.

Run as a script, without TRITON_INTERPRET (``test_gpu_compile.py`` does so in a
subprocess). It goes through triton's whole pipeline (TTIR, TTGIR, LLVM, PTX,
ptxas), so rules that only the compiler enforces -- constexpr-only globals,
``tl.dot`` shapes >= 16, operand dtypes, shared-memory size -- are checked
where no GPU exists. Prints one line per variant: ``name shared_bytes``.
"""

from __future__ import annotations

import sys
from typing import Any

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from streamgen.kernels.decode_reduce import _decode_reduce_kernel
from streamgen.kernels.paged_decode import _paged_decode_kernel
from streamgen.kernels.paged_extend import _paged_extend_kernel
from streamgen.kernels.reshape_and_cache import _reshape_and_cache_kernel

TARGET = GPUTarget("cuda", 90, 32)
FLOAT_ARGS = {"scale_log2"}
INT64_POINTERS = {"block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr", "seq_ids_ptr"}


def _signature(kernel: Any, cache: str, model: str, constexprs: dict[str, Any]) -> dict[str, str]:
    pointer_types = {
        "k_cache_ptr": cache,
        "v_cache_ptr": cache,
        "tree_mask_ptr": "u8",
        "slot_mapping_ptr": "i64",
        "k_scale_ptr": "fp32",
        "v_scale_ptr": "fp32",
    }
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif name.endswith("_ptr"):
            default = "fp32" if name.startswith("partial_") else model
            element = "i64" if name in INT64_POINTERS else pointer_types.get(name, default)
            signature[name] = "*" + element
        else:
            signature[name] = "i32"
    return signature


def _variants() -> list[tuple[str, Any, str, str, dict[str, Any]]]:
    bf16 = dict(DOT_DTYPE=tl.bfloat16, DOT_PRECISION="tf32")
    decode = dict(QUERY_GROUP=4, BLOCK_GROUP=16, HEAD_DIM=128, BLOCK_DIM=128, BLOCK_SIZE=16)
    extend = dict(QUERY_GROUP=4, BLOCK_GROUP=4, BLOCK_QUERY=16, HEAD_DIM=128, BLOCK_DIM=128)
    reshape = dict(NUM_KV_HEADS=8, BLOCK_HEADS=8, HEAD_DIM=128, BLOCK_DIM=128, BLOCK_SIZE=16)
    return [
        ("reshape_and_cache fp8", _reshape_and_cache_kernel, "fp8e4nv", "bf16",
         dict(reshape, IS_FP8=True)),
        ("paged_decode bf16 split-K window", _paged_decode_kernel, "bf16", "bf16",
         dict(decode, **bf16, TILE=64, PARTITION_SIZE=512, IS_FP8=False, HAS_WINDOW=True,
              SINGLE_PARTITION=False)),
        ("paged_decode fp8 single", _paged_decode_kernel, "fp8e4nv", "bf16",
         dict(decode, **bf16, TILE=64, PARTITION_SIZE=512, IS_FP8=True, HAS_WINDOW=False,
              SINGLE_PARTITION=True)),
        ("decode_reduce", _decode_reduce_kernel, "bf16", "bf16",
         dict(HEAD_DIM=128, BLOCK_DIM=128, PARTITION_SIZE=512, BLOCK_PARTITIONS=8,
              HAS_WINDOW=True)),
        ("paged_extend bf16 tree seq_ids", _paged_extend_kernel, "bf16", "bf16",
         dict(extend, **bf16, BLOCK_SIZE=16, TILE=64, IS_FP8=False, HAS_WINDOW=False,
              HAS_TREE_MASK=True, HAS_SEQ_IDS=True)),
        ("paged_extend fp8 window", _paged_extend_kernel, "fp8e4nv", "fp16",
         dict(extend, DOT_DTYPE=tl.bfloat16, DOT_PRECISION="tf32", BLOCK_SIZE=16, TILE=64,
              IS_FP8=True, HAS_WINDOW=True, HAS_TREE_MASK=False, HAS_SEQ_IDS=False)),
    ]  # fmt: skip


def main(selected: list[str]) -> None:
    for name, kernel, cache, model, constexprs in _variants():
        if selected and not any(word in name for word in selected):
            continue
        source = ASTSource(kernel, _signature(kernel, cache, model, constexprs), constexprs)
        compiled = triton.compile(source, target=TARGET, options={"num_warps": 4})
        assert "cubin" in compiled.asm, name
        print(f"{name} {compiled.metadata.shared}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

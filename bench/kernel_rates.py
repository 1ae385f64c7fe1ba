"""Rates of one quantized linear layer per ISA variant, weight type and activation rows.

    python -m bench.kernel_rates [--types Q4_1,Q8_0] [--isas AVX2,AVX512VNNI] [--rows 1,8,32]

A random packed weight of ``--out`` x ``--in`` (1536 x 1536 by default: 1.3 MB of Q4_1,
resident in L2, so the figures are the kernels' instruction throughput, not memory
bandwidth) times ``rows`` activation rows, on one thread, through the same entry point
the model uses (activation quantization included). Best of 5 timed batches; prints
GMAC/s per ISA the CPU has, and the CPU's SIMD flags (a figure is only comparable on the
same CPU). At 1 row the Python call around the kernel is a visible share of the time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.llama_cpp_tools import simd_flags
from streamgen.checkpoint.gguf_quants import QuantType, packed_weight
from streamgen.native.qkernels import Isa, QuantContext, supported_isas
from tests.native.quant_reference import random_unpacked


def rate(ctx: QuantContext, weight: object, x: torch.Tensor, macs: int) -> float:
    """GMAC/s of ``ctx.linear(weight, x)``, best of 5 batches."""
    reps = max(20, 2000 // x.shape[0])
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            ctx.linear(weight, x)  # type: ignore[arg-type]
        best = min(best, (time.perf_counter() - start) / reps)
    return macs / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default="Q4_1,Q5_0,Q8_0,Q4_K,Q6_K")
    parser.add_argument("--isas", default=None, help="default: every ISA this CPU runs")
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--out", type=int, default=1536)
    parser.add_argument("--in", dest="inputs", type=int, default=1536)
    args = parser.parse_args()
    isas = (
        [Isa[name] for name in args.isas.split(",")]
        if args.isas
        else [i for i in supported_isas() if i != Isa.SCALAR]
    )
    contexts = {isa: QuantContext.create(isa=isa, threads=1) for isa in isas}
    rng = np.random.default_rng(0)
    print(f"CPU flags: {', '.join(simd_flags())}; {args.out} x {args.inputs}, 1 thread")
    print("| type | rows | " + " | ".join(f"{isa.name} GMAC/s" for isa in isas) + " |")
    print("|---|---|" + "---|" * len(isas))
    for name in args.types.split(","):
        weight = packed_weight(random_unpacked(QuantType[name], args.out, args.inputs, rng))
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, args.inputs)
            macs = rows * args.out * args.inputs
            rates = [rate(ctx, weight, x, macs) for ctx in contexts.values()]
            print(f"| {name} | {rows} | " + " | ".join(f"{r:.1f}" for r in rates) + " |")


if __name__ == "__main__":
    main()

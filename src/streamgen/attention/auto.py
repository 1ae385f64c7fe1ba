"""What ``attention_backend="auto"`` means for a model on a device.

CPU, real models: ``native`` where the native kernels build (a C compiler;
decodes, trees and short chunks read the paged cache in place, prefill chunks
go to SDPA); else ``flex`` when inductor can compile it here (the probe
compiles nothing), in fallback mode, so a compile failure later degrades to
``torch`` instead of failing requests; else ``torch``. Tiny models (tests)
get ``torch``, the reference itself. CUDA:
:func:`~streamgen.attention.registry.default_backend_name`.

Measured on 2 AVX2 cores, 1 thread, one layer of 64 decodes of SmolLM2 shapes
(29k keys, fp32): torch reference (gather + SDPA) ~27 ms, flex ~10 ms, native
~6 ms; flex had made the engine's throughput 1.5x the reference's (fp32).
"""

from __future__ import annotations

import torch

from streamgen.attention.backend import AttentionBackend
from streamgen.model.config import ModelSpec

# Below this many decoder parameters a model is a test toy: compiling flex costs more
# than all its attention (tests use ~0.1M; SmolLM2-135M has ~106M in its decoder).
MIN_FLEX_DECODER_PARAMS = 10_000_000

# Decode groups whose contexts add up to fewer keys go to the reference. Per layer, SmolLM2
# shapes, 1 thread, 2,000-page pool: gather + SDPA costs ~0.25 ms + 0.7 us per key, a flex
# call ~0.4 ms + 0.5 us per key (its fixed cost is mostly dynamo's guard check). At batch 1
# flex made a decode step 40% slower (75 vs 54 ms, fp32); from ~2,000 keys on it wins.
FLEX_MIN_DECODE_KEYS = 2048


def resolve_backend(
    name: str, spec: ModelSpec, device: torch.device | str
) -> AttentionBackend | str:
    """``name`` itself unless it is ``"auto"``; then a backend (or its name) for
    ``spec`` on ``device``.

    >>> resolve_backend("torch", spec, "cpu")  # doctest: +SKIP
    'torch'
    """
    if name != "auto":
        return name
    device = torch.device(device)
    if device.type != "cpu":
        from streamgen.attention.registry import default_backend_name

        return default_backend_name(device)
    if decoder_params(spec) < MIN_FLEX_DECODER_PARAMS:
        return "torch"
    from streamgen.native import native_kernels

    if native_kernels() is not None:
        from streamgen.attention.native import NativeAttentionBackend

        return NativeAttentionBackend()
    from streamgen.attention.flex import FlexAttentionBackend, flex_available

    if not flex_available(device):
        return "torch"
    return FlexAttentionBackend(fallback_to_reference=True, min_decode_keys=FLEX_MIN_DECODE_KEYS)


def decoder_params(spec: ModelSpec) -> int:
    """Parameters of the decoder layers (attention and MLP weights, no embeddings)."""
    attention = spec.hidden_size * (spec.q_size + 2 * spec.kv_size) + spec.q_size * spec.hidden_size
    mlp = 3 * spec.hidden_size * spec.intermediate_size
    return spec.num_layers * (attention + mlp)

"""Small steps of a :class:`~streamgen.model.llama.LlamaModel` in one native call.

A step of at most ``MAX_NATIVE_ROWS`` new tokens on the CPU (decodes, short
prefill chunks, speculative draft trees, in any mix) runs its decoder layers
in ``sg_forward_layers`` (``streamgen/native/decode_kernels.c``) instead of
~30 torch ops per layer: embeddings and rope angles are computed by torch,
then one foreign call runs every layer and the final norm. Larger steps
(long prefills, big decode batches) stay on the torch path, whose batched
matmuls and attention backends win there.

The residual stream is float32 inside the call, also for bfloat16 weights,
whose rows are widened in registers: the step reads each weight once, at
memory speed. The attention backend is bypassed: the kernel writes K/V into
the paged cache and attends over it like the torch reference, with the
step's tree mask where it has one (with a sliding window, a tree row's window
counts back from its depth, as the torch reference's does).

What differs between families reaches the kernel as data, not branches: a layer's
norms by role (inputs: Llama; outputs: OLMo 2; both: Gemma 3), its window and which
rope tables it takes (Gemma 3's sliding layers have their own base), the gate's
activation (SwiGLU, GeGLU), the residual scale (Granite) and q / k norms (Qwen3, OLMo
2) and Gemma 2's attention soft-cap.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any, cast

import torch

from streamgen.attention.backend import AttentionMetadata
from streamgen.model.linear import Linear as LinearLayer
from streamgen.model.quantized import kernel_context
from streamgen.model.rope import rotary_dim
from streamgen.native.kernels import (
    ACTIVATION_CODES,
    MAX_NATIVE_ROWS,
    NativeKernels,
    NativeLayer,
    NativeModel,
    dtype_code,
    kv_dtype_code,
    native_linear,
    ptr,
)
from streamgen.native.qkernels import Isa, attention_table

if TYPE_CHECKING:
    from streamgen.model.llama import DecoderLayer, LlamaModel


class NativeDecoder:
    """Runs the decoder stack of ``model`` over small steps through :class:`NativeKernels`.

    >>> decoder = NativeDecoder.for_model(model, native_kernels())  # doctest: +SKIP
    >>> if decoder is not None and decoder.accepts(metadata, num_tokens): ...
    """

    def __init__(self, model: LlamaModel, kernels: NativeKernels) -> None:
        spec = model.spec
        self.model = model
        self.kernels = kernels
        self.dtype = model.dtype
        code = dtype_code(self.dtype)
        assert code is not None
        qctx = _packed_context(model)
        isa = None if qctx is None else Isa(qctx.contents.isa)
        self.struct = NativeModel(
            spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size,
            spec.num_heads, spec.num_kv_heads, spec.head_dim, 0,
            spec.sliding_window or 0, spec.rms_norm_eps, spec.softmax_scale, code,
            spec.residual_scale,
            None if qctx is None else ctypes.addressof(qctx.contents),
            ACTIVATION_CODES[spec.hidden_act], int(spec.qk_norm_whole),
            rotary_dim(spec.rope, spec.head_dim), 1,
            # the quantized kernels' ISA (a quantized model), else this process's: the
            # attention backend's (attention/native.py) too
            attention_table(isa),
            spec.attn_logit_softcap or 0.0, code,  # kv_dtype: the caches' (_layers)
        )
        # Quantized models run every step here, whatever its size: the int8 kernels beat
        # torch at prefill sizes too, and one code path makes a row's result independent
        # of the step it shares (batch invariance: see exp_shifted in simd_f32.h).
        self.max_rows = None if qctx is not None else MAX_NATIVE_ROWS
        self._layer_key: tuple[object, ...] = ()
        self._layer_array: ctypes.Array[NativeLayer] | None = None

    @classmethod
    def for_model(cls, model: LlamaModel, kernels: NativeKernels | None) -> NativeDecoder | None:
        """A decoder where the kernels exist and cover the model's device, dtype and
        weight layout (``[out, in]``)."""
        weight = model.norm.weight
        if kernels is None or weight.device.type != "cpu" or dtype_code(model.dtype) is None:
            return None
        if any(isinstance(m, LinearLayer) and m.splits is not None for m in model.modules()):
            return None
        spec = model.spec
        if spec.hidden_act not in ACTIVATION_CODES:
            return None
        return cls(model, kernels)

    def accepts(
        self,
        metadata: AttentionMetadata,
        num_tokens: int,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> bool:
        """Whether this step is small (at most ``MAX_NATIVE_ROWS`` new tokens; any size for
        a quantized model) and its caches are contiguous CPU tensors the kernels read
        (float32, bfloat16 or float16)."""
        k_cache = kv_caches[0][0]
        return (
            num_tokens > 0
            and (self.max_rows is None or num_tokens <= self.max_rows)
            and kv_dtype_code(k_cache.dtype) is not None
            and k_cache.device.type == "cpu"
            and k_cache.is_contiguous()
        )

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [m] int64, the step's new tokens
        positions: torch.Tensor,  # [m] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        metadata: AttentionMetadata,
        num_layers: int,
    ) -> torch.Tensor:  # [m, hidden] in the model's dtype, after the final norm
        model = self.model
        x = model.embed(input_ids).float()  # [m, hidden]
        cos, sin = model.rope_angles(positions)  # [m, rotary_dim / 2] each
        local = model.local_rope_angles(positions)  # Gemma 3's sliding layers, or None
        layers = self._layers(kv_caches)
        if num_layers > len(layers):
            raise ValueError(f"{num_layers} layers asked, {len(layers)} caches given")
        out = torch.empty_like(x)
        tree = metadata.tree_mask
        self.kernels.forward_layers(
            self.struct, layers, num_layers, x, cos, sin, local,
            metadata.slot_mapping.contiguous(),
            metadata.query_start_loc.contiguous(),
            metadata.seq_lens.contiguous(),
            metadata.block_tables.contiguous(),
            None if tree is None else tree.contiguous(),  # bool: one byte per entry
            model.norm.weight, out,
        )
        return out.to(self.dtype)

    def _layers(
        self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> ctypes.Array[NativeLayer]:
        """The layer structs for this set of caches, rebuilt whenever any cache address
        differs: a new engine's cache may reuse some addresses of a freed one, so the
        key is every K and V address (only the last set is kept)."""
        count = min(len(kv_caches), len(self.model.layers))
        k_cache = kv_caches[0][0]
        key = (str(k_cache.dtype), k_cache.shape[1],
               *(int(t.data_ptr()) for pair in kv_caches[:count] for t in pair))  # fmt: skip
        if self._layer_key == key and self._layer_array is not None:
            return self._layer_array
        kv_code = kv_dtype_code(k_cache.dtype)
        assert kv_code is not None  # accepts() checked it
        self.struct.kv_dtype, self.struct.block_size = kv_code, k_cache.shape[1]
        array = (NativeLayer * count)()
        spec = self.model.spec
        for i, (layer, (k_cache, v_cache)) in enumerate(
            zip(self.model.layers[:count], kv_caches[:count], strict=True)
        ):
            layer = cast("DecoderLayer", layer)
            attn, mlp = layer.self_attn, layer.mlp
            norms = (ctypes.c_void_p * 4)(*(  # by role, NORM_ROLE_ORDER
                None if norm is None else ptr(norm.weight) for norm in layer.role_norms
            ))  # fmt: skip
            sliding = spec.is_sliding(i)
            window = spec.local_window if sliding else spec.sliding_window
            array[i] = NativeLayer(
                _linear(attn.qkv_proj), _linear(attn.o_proj),
                _linear(mlp.gate_up_proj), _linear(mlp.down_proj),
                norms, ptr(k_cache), ptr(v_cache),
                None if attn.q_norm is None else ptr(attn.q_norm.weight),
                None if attn.k_norm is None else ptr(attn.k_norm.weight),
                window or 0, int(sliding and spec.local_rope is not None), 0,
            )  # fmt: skip
        self._layer_key, self._layer_array = key, array
        return array


def _packed_context(model: LlamaModel) -> Any:
    """A quantized model's kernel context (``ctypes.POINTER(QContextStruct)``: its ISA and
    the worker pool, which also runs the attention tiles), or None for dense models."""
    context = kernel_context(model)
    return None if context is None else ctypes.pointer(context.struct)


def _linear(linear: LinearLayer) -> ctypes.Structure:
    if linear.native is not None and linear.packed is not None:
        return linear.native[1]  # SG_QUANT: the packed parts' struct
    if linear.splits is not None:
        raise ValueError("native kernels need [out, in] weights (the loader keeps that layout)")
    return native_linear(linear.weight, linear.bias)

"""The quantization settings a caller can ask for (no heavy imports: configs validate here)."""

from __future__ import annotations

from streamgen.errors import ConfigError

# EngineConfig.quantization values for dense checkpoints -> GGUF type.
QUANTIZE_AT_LOAD = {
    "q8_0": "Q8_0",
    "q4_0": "Q4_0",
    "q4_1": "Q4_1",
    "q5_0": "Q5_0",
    "q5_1": "Q5_1",
    "q4_k": "Q4_K",
}
# A tensor whose rows do not split into the type's blocks takes llama.cpp's fallback
# (llama-quant.cpp's tensor_type_fallback); rows that 32 does not divide stay dense.
FALLBACK_TYPE = {"Q4_K": "Q5_0"}
QUANTIZATIONS = (None, "auto", "gguf", *QUANTIZE_AT_LOAD)
ACTIVATION_BITS = (8, 16)


def check_quantization(value: object, activation_bits: object = 8) -> None:
    """Raise :class:`ConfigError` naming the setting unless both are allowed values."""
    if not (value is None or isinstance(value, str)) or value not in QUANTIZATIONS:
        raise ConfigError(f"quantization={value!r}: use one of {list(QUANTIZATIONS)}")
    if isinstance(activation_bits, bool) or activation_bits not in ACTIVATION_BITS:
        raise ConfigError(f"activation_bits={activation_bits!r}: use 8 or 16")

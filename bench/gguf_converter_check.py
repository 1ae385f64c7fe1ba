"""GGUF files written by llama.cpp's own converter, served by streamgen, against HF.

For each GGUF architecture streamgen reads, a tiny random HF model of that family
(``tests/checkpoint/gguf_from_hf.py``'s configs) goes through llama.cpp's
``convert_hf_to_gguf.py`` (from the llama-cpp-python 0.3.36 sdist, unpacked once:
``bench.llama_cpp_tools.converter_dir``) at F32; streamgen serves the file dense and its
logits over a prompt are compared with HF transformers' on the original weights. The
tests write the same files with streamgen's own writer of llama.cpp's layout; this is the
check that the writer and the converter agree.

One patch to the converter: the tiny model's byte-level BPE tokenizer has no hash in the
converter's pre-tokenizer table and no ``tokenizer.model``, so every vocabulary setter
takes the BPE as ``gpt2``. Tensors, metadata and their transforms are the converter's.

    python -m bench.gguf_converter_check [--archs llama,gemma2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "checkpoint"))

from gguf_from_hf import CHATML, FAMILY_CONFIGS, tiny_config, train_tokenizer  # noqa: E402

PROMPT = "The quick brown fox: 3.14159, they'll say.\n"
TOLERANCE = 1e-4
# Run in a child process: llama.cpp's gguf-py must not meet the installed gguf package.
DRIVER = """
import runpy, sys
from pathlib import Path
converter, model_dir, out = sys.argv[1:4]
sys.path.insert(0, converter)
sys.path.insert(1, str(Path(converter) / "gguf-py"))
import conversion.base as base
import conversion.gemma, conversion.llama, conversion.phi, conversion.qwen
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt2"
for module in (conversion.gemma, conversion.llama, conversion.phi, conversion.qwen):
    for cls in vars(module).values():
        if isinstance(cls, type) and issubclass(cls, base.TextModel) and "set_vocab" in vars(cls):
            cls.set_vocab = base.TextModel._set_vocab_gpt2
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", "f32"]
runpy.run_path(str(Path(converter) / "convert_hf_to_gguf.py"), run_name="__main__")
"""


def check(arch: str, converter: Path, work: Path, bpe: object) -> float:
    """max |streamgen - HF| over the prompt's logits for a converted tiny ``arch`` model."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from streamgen import load_model
    from streamgen.runner.batch import ModelBatch, SequenceChunk
    from streamgen.runner.kv_cache import KVCacheConfig
    from streamgen.runner.model_runner import ModelRunner

    torch.manual_seed(0)
    config = tiny_config(arch, bpe.get_vocab_size())  # type: ignore[attr-defined]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            norm = "norm" in name
            param.copy_((1.0 if norm else 0.0) + (0.2 if norm else 0.08) * torch.randn_like(param))
    hf_dir, gguf = work / arch, work / f"{arch}.gguf"
    model.save_pretrained(hf_dir)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(hf_dir)
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(converter), str(hf_dir), str(gguf)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"{arch}: the converter failed:\n{result.stderr[-2000:]}")
    loaded = load_model(gguf, quantization=None)
    ids = loaded.tokenizer.encode(PROMPT)
    runner = ModelRunner(loaded, KVCacheConfig(block_size=16, num_blocks=16))
    blocks = list(range(-(-len(ids) // 16)))
    ours = runner.forward_logits(ModelBatch([SequenceChunk("r", ids, 0, blocks)]))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    return float((ours - expected).abs().max())


def main() -> None:
    from bench.llama_cpp_tools import VERSION, converter_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(FAMILY_CONFIGS))
    args = parser.parse_args()
    converter = converter_dir()
    bpe = train_tokenizer()
    failed = []
    print(f"llama.cpp {VERSION} convert_hf_to_gguf.py -> streamgen (dense) vs HF transformers")
    with tempfile.TemporaryDirectory(prefix="gguf-converter-check-") as tmp:
        for arch in args.archs.split(","):
            error = check(arch, converter, Path(tmp), bpe)
            verdict = "ok" if error <= TOLERANCE else "FAILED"
            failed += [arch] if error > TOLERANCE else []
            print(f"  {arch:8s} max |streamgen - HF| = {error:.2e}  {verdict}", flush=True)
    if failed:
        raise SystemExit(f"logits differ from HF beyond {TOLERANCE}: {failed}")


if __name__ == "__main__":
    main()

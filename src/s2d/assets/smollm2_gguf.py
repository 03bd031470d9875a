"""Asset build step: a GGUF causal LM (SmolLM2-135M-Instruct, Q4_1) -> a float Hugging Face directory.

transformers reads GGUF through the ``gguf`` package and dequantizes every tensor to float32 (the Q4_1
Linear weights stay on their 4-bit grid: 16 levels per block of 32). The result is saved once with
``save_pretrained`` (safetensors) together with the tokenizer held in the same file, so that loading
the asset never parses GGUF again.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf
from torch import nn

__all__ = ["load_gguf", "convert_gguf"]


def load_gguf(path: Path) -> tuple[nn.Module, tf.PreTrainedTokenizerBase]:
    """(float32 ``*ForCausalLM``, tokenizer) read from the GGUF file ``path`` (dequantized by transformers)."""
    path = Path(path)
    tokenizer = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def convert_gguf(path: Path, out: Path) -> None:
    """Write the dequantized model of GGUF file ``path`` and its tokenizer into directory ``out``."""
    model, tokenizer = load_gguf(path)
    bad = [n for n, m in model.named_modules() if "Linear" in type(m).__name__ and not isinstance(m, nn.Linear)]
    if bad:
        raise ValueError(f"{path.name}: transformers kept {len(bad)} quantized Linears (e.g. {bad[0]}); "
                         f"expected float nn.Linear after dequantization")
    # The weights are plain float tensors now; drop the GGUF quantizer record so that the directory
    # saves and later loads as an ordinary float checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

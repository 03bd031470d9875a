"""Batch builders for the data loaders: images to normalised ``pixel_values``, texts to padded token
batches, and prompts for causal LMs (``text_mask`` marks the text inside the prompt)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

__all__ = ["ImageCollate", "TextCollate", "PromptCollate"]


class ImageCollate:
    """uint8 (B, C, h, w) -> normalised float (B, 3, S, S) ``pixel_values`` + ``labels``."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        x = torch.stack([b[0] for b in batch]).float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                align_corners=False)
        return {"pixel_values": (x - self.mean) / self.std,
                "labels": torch.tensor([b[1] for b in batch], dtype=torch.long)}


class TextCollate:
    """Tokenise a batch with dynamic padding (to the longest item, at most ``max_length``)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([b[0] for b in batch], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        out = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out["labels"] = torch.tensor([b[1] for b in batch], dtype=torch.long)
        return out


class PromptCollate:
    """Fill ``template`` (one ``{text}`` slot, e.g. "Review: {text}\nSentiment:") for a causal LM.

    The text alone is truncated so that the prompt fits ``max_length`` tokens and always ends with the
    template's suffix; padding goes right. Batches: {"input_ids", "attention_mask", "text_mask" (the
    tokens of the text itself, for held-out perplexity), "labels"}.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, template: str):
        if template.count("{text}") != 1:
            raise ValueError(f"data.prompt must contain '{{text}}' exactly once, got {template!r}")
        prefix, suffix = template.split("{text}")
        self.space = prefix.endswith(" ")          # "Review: {text}": the space belongs to the text's first token
        encode = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
        self.encode, self.prefix, self.suffix = encode, encode(prefix.rstrip(" ")), encode(suffix)
        self.room = max_length - len(self.prefix) - len(self.suffix)
        if self.room < 1:
            raise ValueError(f"data.max_length={max_length} leaves no room for the text in prompt {template!r}")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        rows = [self.encode((" " if self.space else "") + b[0].strip())[: self.room] for b in batch]
        width = max(len(self.prefix) + len(r) + len(self.suffix) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        text = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            seq = self.prefix + r + self.suffix
            ids[i, : len(seq)] = torch.tensor(seq)
            attn[i, : len(seq)] = 1
            text[i, len(self.prefix): len(self.prefix) + len(r)] = True
        return {"input_ids": ids, "attention_mask": attn, "text_mask": text,
                "labels": torch.tensor([b[1] for b in batch], dtype=torch.long)}

"""Wrappers that give other model APIs the ``forward(..., labels=None) -> .logits/.loss`` of a Hugging
Face classifier, so training, probes and quantization treat them alike: timm and SigLIP2 (NaFlex) image
models, and a causal LM scored by the likelihood of label words after a prompt."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.modeling_outputs import ImageClassifierOutput, ModelOutput

__all__ = ["TimmClassifier", "NaFlexClassifier", "CausalLMClassifier", "PromptClassifierOutput", "label_token_ids"]


class TimmClassifier(nn.Module):
    """Wrap a timm model so that ``forward(pixel_values, labels=None)`` returns ``.logits``/``.loss``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.model(pixel_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


class NaFlexClassifier(nn.Module):
    """Feed a SigLIP2 (NaFlex) classifier from ordinary images, as the other image models are fed.

    ``forward(pixel_values (B, C, H, W), labels=None)`` cuts the images into ``patch_size`` squares in
    the order of transformers' Siglip2 image processor (rows, then columns; each patch flattened as
    (p, p, C)), and passes them with an all-ones patch mask and the (H/p, W/p) grid to the wrapped model.
    """

    def __init__(self, model: nn.Module, patch_size: int):
        super().__init__()
        self.model = model
        self.patch_size = patch_size

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        b, c, h, w = pixel_values.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {p}")
        patches = (pixel_values.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
                   .reshape(b, (h // p) * (w // p), p * p * c))
        mask = torch.ones(patches.shape[:2], dtype=torch.long, device=patches.device)
        grid = torch.tensor([[h // p, w // p]], device=patches.device).expand(b, 2)
        return self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=grid, labels=labels)


def label_token_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[int]:
    """The token id of each label word as it follows the prompt (with a leading space).

    Raises ValueError naming the word when it is not exactly one token, or when two words share a token.
    """
    ids = []
    for word in words:
        toks = tokenizer.encode(" " + word.strip(), add_special_tokens=False)
        if len(toks) != 1:
            raise ValueError(f"label word {word!r} is {len(toks)} tokens for this tokenizer; "
                             f"data.label_words must be single-token words (e.g. 'positive', 'negative')")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"data.label_words {list(words)} do not map to distinct tokens")
    return ids


@dataclass
class PromptClassifierOutput(ModelOutput):
    """What :class:`CausalLMClassifier` returns."""
    loss: torch.Tensor | None = None       # mean -log p(true label word | prompt), nats
    logits: torch.Tensor | None = None     # (B, C) log p(label word c | prompt)
    text_nll: torch.Tensor | None = None   # (B,) mean NLL of the text tokens, nats/token (eval mode only)


class CausalLMClassifier(nn.Module):
    """A causal LM used as a classifier: class c scores log p(label word c | prompt).

    ``forward(input_ids (B, T), attention_mask (B, T), text_mask=None, labels=None)`` takes right-padded
    prompts such as "Review: <text>\nSentiment:". The label words' log-probabilities at the last real
    token are the ``logits`` (their argmax is the maximum-likelihood label); ``loss`` is the causal-LM
    loss on the answer token only. In eval mode with ``text_mask`` (B, T) (the tokens of the text
    itself), ``text_nll`` is each example's mean next-token NLL over those tokens (held-out perplexity
    = exp of it). The LM head runs on the last token only unless ``text_nll`` is computed.
    """

    def __init__(self, lm: nn.Module, label_ids: Sequence[int]):
        super().__init__()
        self.lm = lm
        self.register_buffer("label_ids", torch.tensor(list(label_ids), dtype=torch.long), persistent=False)

    @property
    def config(self):
        return self.lm.config

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def save_pretrained(self, path, **kwargs) -> None:
        """Save the wrapped LM as a Hugging Face directory (the label words belong to the data)."""
        self.lm.save_pretrained(path, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> PromptClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(1).clamp(min=1) - 1                                  # (B,) right padding
        answer = self.lm.get_output_embeddings()(hidden[torch.arange(len(last), device=last.device), last])
        logits = answer.float().log_softmax(-1)[:, self.label_ids]                    # (B, C)
        loss = -logits.gather(1, labels[:, None]).mean() if labels is not None else None
        text_nll = None
        if text_mask is not None and not self.training:
            text_nll = self._text_nll(hidden, input_ids, text_mask)
        return PromptClassifierOutput(loss=loss, logits=logits, text_nll=text_nll)

    def _text_nll(self, hidden: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B,) mean NLL of the tokens ``text_mask`` marks, each predicted from the tokens before it."""
        logp = self.lm.get_output_embeddings()(hidden[:, :-1]).float().log_softmax(-1)   # (B, T-1, V)
        nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)                     # (B, T-1)
        mask = text_mask[:, 1:].to(nll.dtype)
        return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)

"""Wrappers that give other model APIs the ``forward(pixel_values, labels=None) -> .logits/.loss`` of a
Hugging Face image classifier, so training, probes and quantization treat them alike."""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

__all__ = ["TimmClassifier", "NaFlexClassifier"]


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

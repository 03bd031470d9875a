"""Tiny random transformer classifiers and calibration batches shared by the PTQ method tests."""
from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    """Post-LN BERT encoder classifier: hidden 32, 2 layers, 2 heads."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    """Pre-LN ViT classifier: 16x16 images, patch 4, hidden 32, 2 layers, 2 heads."""
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=3)
    return ViTForImageClassification(cfg).eval()


def text_batches(n: int = 2, b: int = 8, t: int = 12) -> list[dict]:
    """Random token batches; half of each batch has 4 padded positions."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[: b // 2, t - 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(b, dtype=torch.long)})
    return out


def image_batches(n: int = 2, b: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(b, 3, 16, 16, generator=g)} for _ in range(n)]


MODELS = {"bert": (tiny_bert, text_batches), "vit": (tiny_vit, image_batches)}


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

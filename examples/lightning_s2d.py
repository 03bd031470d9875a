"""S2D with PyTorch Lightning (``pip install lightning``): add one callback.

    python examples/lightning_s2d.py                                  # 1 device
    python examples/lightning_s2d.py --devices 8 --strategy ddp       # 8 GPUs, DDP
    python examples/lightning_s2d.py --devices 8 --strategy fsdp      # 8 GPUs, FSDP

A BERT-shaped classifier (MiniLM-L6's shape, random weights) on random tokens. The callback attaches
SelectiveSpectralDecay when fitting starts and stores its state in Lightning checkpoints.
"""
from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from s2d import S2DConfig
from s2d.integrations.lightning import S2DLightningCallback


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        self.model = BertForSequenceClassification(BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, num_labels=2))

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        loss = self.model(input_ids=ids, labels=labels).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--interval", type=int, default=10)
    args = p.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (256, 64))
    data = DataLoader(TensorDataset(ids, (ids[:, 0] > 1500).long()), batch_size=8, shuffle=True)
    s2d = S2DLightningCallback(S2DConfig(interval=args.interval))
    trainer = pl.Trainer(max_steps=args.steps, devices=args.devices, strategy=args.strategy, callbacks=[s2d],
                         logger=False, enable_checkpointing=False)
    trainer.fit(Classifier(), data)
    if trainer.is_global_zero:
        stats = s2d.layer_stats()
        print(f"S2D penalised {sum(s.k_target is not None for s in stats)}/{len(stats)} layers at the last refresh")


if __name__ == "__main__":
    main()

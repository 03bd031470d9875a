"""S2D with the Hugging Face Trainer: add ``S2DCallback`` to ``callbacks``.

    python examples/hf_trainer_s2d.py                                            # 1 device
    accelerate launch --multi_gpu --num_processes 8 examples/hf_trainer_s2d.py    # 8 GPUs, DDP
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 8 examples/hf_trainer_s2d.py   # FSDP2
    torchrun --nproc_per_node 8 examples/hf_trainer_s2d.py                        # 8 GPUs, DDP

A BERT-shaped classifier (MiniLM-L6's shape, random weights) on random tokens; S2D's state is saved
as ``checkpoint-N/s2d_state.pt`` and restored by ``trainer.train(resume_from_checkpoint=True)``.
"""
from __future__ import annotations

import argparse

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from s2d import S2DConfig
from s2d.integrations.hf import S2DCallback


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 512) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1000, 2000, (n, 64), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": int(self.ids[i, 0] > 1500)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/hf_trainer_s2d")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    model = BertForSequenceClassification(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                     intermediate_size=1536, num_labels=2))
    callback = S2DCallback(S2DConfig(interval=args.interval))
    targs = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8,
                              learning_rate=2e-5, save_steps=10, logging_steps=5, report_to="none")
    trainer = Trainer(model=model, args=targs, train_dataset=RandomTokens(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    if trainer.is_world_process_zero():
        stats = callback.layer_stats()
        print(f"S2D penalised {sum(s.k_target is not None for s in stats)}/{len(stats)} layers at the last refresh")


if __name__ == "__main__":
    main()

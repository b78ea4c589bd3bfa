"""Runs UnlearningTrainer on a tiny GPT-2 and saves the trainable parameters (rank 0) to argv[2].

Launched by tests/test_huggingface.py alone and under ``torch.distributed.run`` with two CPU
processes (gloo): both must give the same parameters.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from overunlearn.integrations.huggingface import UnlearningTrainer
from overunlearn.problem import CausalLMTask


class Dicts(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def main(method: str, out: str) -> None:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(1, 30, (20, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    retain, forget = Dicts(ids[:14], labels[:14]), Dicts(ids[14:], labels[14:])
    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(output_dir=d, per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                                 report_to=[], use_cpu=True, save_strategy="no", max_grad_norm=0,
                                 ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None, disable_tqdm=True)
        kwargs = {"reg_coef": 0.05, "grad_sample_size": 4} if method == "minnorm_og" else {}
        trainer = UnlearningTrainer(model, args, method=method, method_kwargs=kwargs, retain_dataset=retain,
                                    forget_dataset=forget, task=CausalLMTask())
        trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""A tiny Llama built from a config and synthetic token data whose examples have very different
numbers of label tokens (where a mean of batch means goes wrong)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dualadam_hf  # noqa: F401  (registers optim="dualadam")

SEQ_LEN = 16
VOCAB = 64


class TokenDataset(torch.utils.data.Dataset):
    """Fixed-length rows; the first ``prompt`` tokens of each row are masked out of the labels."""

    def __init__(self, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(3, VOCAB, (n, SEQ_LEN), generator=gen)
        prompts = torch.randint(1, SEQ_LEN - 1, (n,), generator=gen)
        self.labels = self.input_ids.clone()
        for row, prompt in enumerate(prompts.tolist()):
            self.labels[row, :prompt] = -100

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
            "labels": self.labels[i],
        }


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def training_kwargs(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        report_to="none",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=2,
        max_steps=20,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-2,
        weight_decay=0.01,
        optim="dualadam",
        use_cpu=True,
        seed=7,
        data_seed=7,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return kwargs

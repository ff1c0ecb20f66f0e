"""DualAdamMetricsMixin on TRL's SFTTrainer: the same optimizer and the same measures as DualAdamTrainer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from dualadam_hf import DualAdamMetricsMixin, DualAdamTrainer
from dualadam_hf.hf.unwrap import find_dualadam
from dualadam_hf.models.tiny import ALPACA_ZH_SAMPLE, build_tiny_llama, load_tiny_tokenizer


class MySFT(DualAdamMetricsMixin, SFTTrainer):
    pass


@pytest.fixture
def prompt_completion():
    records = [json.loads(line) for line in ALPACA_ZH_SAMPLE.read_text(encoding="utf-8").splitlines()[:48]]
    return Dataset.from_list([{"prompt": r["instruction"], "completion": r["output"]} for r in records])


def test_sft_trainer_with_the_mixin_trains_dualadam_and_reports_its_measures(tmp_path, prompt_completion):
    tokenizer = load_tiny_tokenizer()
    args = SFTConfig(
        output_dir=str(tmp_path), optim="dualadam", optim_args="switch_ratio=0.5", max_steps=4, learning_rate=3e-3,
        eval_strategy="steps", eval_steps=2, logging_steps=1, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, max_length=128, use_cpu=True, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=0,
    )
    trainer = MySFT(model=build_tiny_llama(tokenizer, seed=0), args=args, processing_class=tokenizer,
                    train_dataset=prompt_completion.select(range(40)), eval_dataset=prompt_completion.select(range(40, 48)))
    trainer.train()

    assert find_dualadam(trainer.optimizer) is not None
    history = trainer.state.log_history
    # switch_ratio=0.5 of the 4 steps, resolved from the run's length: alpha_t = 1 - t/2
    assert [entry["dualadam_alpha"] for entry in history if "loss" in entry] == [0.5, 0.0, 0.0, 0.0]
    evaluations = [entry for entry in history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    for entry in evaluations:
        assert entry["eval_ppl"] == pytest.approx(math.exp(entry["eval_loss"]))
        assert entry["eval_gen_gap"] == pytest.approx(entry["eval_loss"] - entry["eval_train_loss"])

    # eval_loss is the token-weighted NLL of the completions, as the tokens SFTTrainer prepared say
    model = trainer.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1]
            targets = labels[:, 1:]
            mask = targets != -100
            nll = torch.nn.functional.cross_entropy(logits[mask].double(), targets[mask], reduction="sum")
            total, count = total + nll.item(), count + int(mask.sum())
    assert trainer.evaluate()["eval_loss"] == pytest.approx(total / count, rel=1e-6)


def test_dualadam_trainer_is_the_mixin_on_the_stock_trainer():
    from transformers import Trainer

    assert DualAdamTrainer.__mro__[1:3] == (DualAdamMetricsMixin, Trainer)

"""optim="dualadam_8bit" through DualAdamTrainer: quantized state, alpha and inv-share logging, and a
checkpoint that the Trainer's own torch.load(weights_only=True) resumes from."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import VOCAB, training_kwargs
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from dualadam_hf import DualAdam8bit, DualAdamTrainer, DualAdamTrainingArguments
from dualadam_hf.optim.lowbit import is_quantized

SWITCH_RATE = 0.04  # alpha_t = 1 - 0.04 t: blending over all 20 steps


def llama_with_quantized_state(seed: int = 0) -> LlamaForCausalLM:
    """tests/tiny_lm.py's Llama is all below the quantization threshold (4096 elements); this one's
    embeddings, q/o and MLP matrices are above it, its k/v matrices and norms below."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


class RecordLogs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs, step=state.global_step))


def make_trainer(output_dir, train_set, **overrides):
    args = DualAdamTrainingArguments(**training_kwargs(output_dir, optim="dualadam_8bit",
                                                       optim_args=f"switch_rate={SWITCH_RATE}", **overrides))
    trainer = DualAdamTrainer(model=llama_with_quantized_state(), args=args, train_dataset=train_set)
    recorder = RecordLogs()
    trainer.add_callback(recorder)
    return trainer, recorder


def losses(recorder):
    return {log["step"]: log["loss"] for log in recorder.logs if "loss" in log}


def test_a_run_saves_resumes_and_continues_like_the_uninterrupted_one(tmp_path, train_set):
    first, first_logs = make_trainer(tmp_path / "a", train_set, save_strategy="steps", save_steps=10)
    first.train()
    optimizer = first.optimizer.optimizer  # behind Accelerate's wrapper
    assert type(optimizer) is DualAdam8bit
    quantized = [p for p in first.model.parameters() if is_quantized(optimizer.state[p]["exp_avg"])]
    assert sum(p.numel() for p in quantized) > 0.8 * sum(p.numel() for p in first.model.parameters())
    logs = [log for log in first_logs.logs if "loss" in log]
    assert all(log["dualadam_alpha"] == pytest.approx(1 - SWITCH_RATE * log["step"]) for log in logs)
    assert all(0.0 < log["dualadam_inv_share"] <= 1.0 for log in logs)

    resumed, resumed_logs = make_trainer(tmp_path / "b", train_set)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-10"))
    after, uninterrupted = losses(resumed_logs), losses(first_logs)
    assert sorted(after) == list(range(11, 21))
    for step, loss in after.items():
        assert loss == pytest.approx(uninterrupted[step], rel=1e-4), step
    alphas = {log["step"]: log["dualadam_alpha"] for log in resumed_logs.logs if "loss" in log}
    assert alphas[11] == pytest.approx(1 - SWITCH_RATE * 11)  # the step counters came back

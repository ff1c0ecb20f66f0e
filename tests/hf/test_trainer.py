"""DualAdamTrainer: evaluation measures, alpha logging, switch_ratio, resume, accumulation, baseline."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import TokenDataset, tiny_llama, training_kwargs
from transformers import TrainerCallback

from dualadam_hf import DualAdam, DualAdamTrainer, DualAdamTrainingArguments
from dualadam_hf.hf.trainer import LaunchConfigError


def make_trainer(tmp_path, train_set, eval_set=None, model=None, **overrides):
    args = DualAdamTrainingArguments(**training_kwargs(tmp_path, **overrides))
    return DualAdamTrainer(model=model or tiny_llama(), args=args, train_dataset=train_set, eval_dataset=eval_set)


def token_weighted_nll(model, dataset):
    """By hand: all label tokens of the set, one sum, one count."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            logits = model(input_ids=item["input_ids"][None]).logits[0, :-1]
            targets = item["labels"][1:]
            mask = targets != -100
            total += F.cross_entropy(logits[mask].double(), targets[mask], reduction="sum").item()
            count += int(mask.sum())
    return total / count


def mean_of_batch_means(model, dataset, batch_size):
    means = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            ids = torch.stack([b["input_ids"] for b in batch])
            labels = torch.stack([b["labels"] for b in batch])
            means.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(means) / len(means)


def test_eval_loss_is_token_weighted_over_the_whole_set(tmp_path, train_set, eval_set):
    trainer = make_trainer(tmp_path, train_set, eval_set, train_eval_samples=len(train_set))
    metrics = trainer.evaluate()
    expected = token_weighted_nll(trainer.model, eval_set)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-6)
    # the set is built so that a mean of batch means is measurably different
    assert abs(mean_of_batch_means(trainer.model, eval_set, 2) - expected) > 1e-3
    assert metrics["eval_ppl"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["eval_train_loss"] == pytest.approx(token_weighted_nll(trainer.model, train_set), rel=1e-6)
    assert metrics["eval_gen_gap"] == pytest.approx(metrics["eval_loss"] - metrics["eval_train_loss"])


def test_training_subset_is_fixed_and_sized_like_the_validation_set(tmp_path, train_set, eval_set):
    trainer = make_trainer(tmp_path, train_set, eval_set)
    subset = trainer._train_subset(len(eval_set))
    assert len(subset) == len(eval_set)
    again = make_trainer(tmp_path, train_set, eval_set)._train_subset(len(eval_set))
    assert subset.indices == again.indices
    off = make_trainer(tmp_path, train_set, eval_set, train_eval_samples=0).evaluate()
    assert "eval_train_loss" not in off and "eval_gen_gap" not in off and "eval_ppl" in off


class RecordLogs(TrainerCallback):
    """Reporters are callbacks: what reaches on_log here reaches TensorBoard, W&B, trackio."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs, step=state.global_step))


def test_switch_ratio_half_of_20_steps_gives_alpha_one_minus_step_over_10(tmp_path, train_set, eval_set):
    trainer = make_trainer(tmp_path, train_set, eval_set, optim_args="switch_ratio=0.5",
                           eval_strategy="steps", eval_steps=10)
    recorder = RecordLogs()
    trainer.add_callback(recorder)
    trainer.train()
    alphas = {log["step"]: log["dualadam_alpha"] for log in recorder.logs if "loss" in log}
    assert sorted(alphas) == list(range(1, 21))
    for step, alpha in alphas.items():
        assert alpha == pytest.approx(max(0.0, 1 - step / 10), abs=1e-12)
    shares = {log["step"]: log["dualadam_inv_share"] for log in recorder.logs if "loss" in log}
    assert all(0.0 < shares[step] <= 1.0 for step in range(1, 10)) and shares[1] > shares[9]
    assert all(shares[step] == 0.0 for step in range(10, 21))
    evals = [log for log in recorder.logs if "eval_loss" in log]
    assert len(evals) == 2
    assert all({"eval_ppl", "eval_train_loss", "eval_gen_gap"} <= set(log) for log in evals)


def test_rescaled_invadam_term_holds_at_least_alpha_of_the_update(tmp_path, train_set):
    """With inv_scale=adam_rms each tensor's InvAdam part is alpha * ||u|| and the whole update at most
    ||u||, so the logged share is at least alpha; without it, at tiny-LM gradient scales, it is ~1e-4."""
    shares = {}
    for inv_scale in ("none", "adam_rms"):
        trainer = make_trainer(tmp_path / inv_scale, train_set, optim_args=f"switch_ratio=0.5,inv_scale={inv_scale}",
                               max_steps=6)
        recorder = RecordLogs()
        trainer.add_callback(recorder)
        trainer.train()
        assert trainer.optimizer.optimizer.param_groups[0]["inv_scale"] == inv_scale
        shares[inv_scale] = {log["step"]: (log["dualadam_inv_share"], log["dualadam_alpha"])
                             for log in recorder.logs if "loss" in log}
    for step, (share, alpha) in shares["adam_rms"].items():
        assert alpha - 1e-6 <= share <= 1.0 + 1e-9, step
    assert all(share < 0.01 for share, alpha in shares["none"].values())


@pytest.mark.parametrize("sharding", ["is_deepspeed_enabled", "is_fsdp_enabled"])
def test_a_rescaling_dualadam_built_by_hand_is_refused_under_sharding(sharding, tmp_path, train_set):
    # optimizer_cls_and_kwargs bypasses optim_args, so the Trainer checks the optimizer it built
    args = DualAdamTrainingArguments(**training_kwargs(tmp_path))
    kwargs = {"lr": 1e-3, "switch_rate": 0.1, "inv_scale": "adam_rms"}
    trainer = DualAdamTrainer(model=tiny_llama(), args=args, train_dataset=train_set,
                              optimizer_cls_and_kwargs=(DualAdam, kwargs))
    assert trainer.create_optimizer().param_groups[0]["inv_scale"] == "adam_rms"  # one process: fine
    trainer.optimizer = None
    setattr(trainer, sharding, True)
    with pytest.raises(LaunchConfigError, match="inv_scale=adam_rms rescales per whole tensor, but "
                                                f"{'DeepSpeed' if 'deepspeed' in sharding else 'FSDP'} hands"):
        trainer.create_optimizer()


def test_adamw_baseline_reports_the_same_metrics_and_no_alpha(tmp_path, train_set, eval_set):
    trainer = make_trainer(tmp_path, train_set, eval_set, optim="adamw_torch", max_steps=4,
                           eval_strategy="steps", eval_steps=4)
    trainer.train()
    history = trainer.state.log_history
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW"
    assert not any("dualadam_alpha" in log or "dualadam_inv_share" in log for log in history)
    evals = [log for log in history if "eval_loss" in log]
    assert evals and {"eval_ppl", "eval_train_loss", "eval_gen_gap"} <= set(evals[-1])


def final_weights(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def test_resume_from_checkpoint_lands_on_the_uninterrupted_weights(tmp_path, train_set):
    first = make_trainer(tmp_path / "a", train_set, optim_args="switch_rate=0.05",
                         save_strategy="steps", save_steps=10)
    first.train()
    expected = final_weights(first)

    resumed = make_trainer(tmp_path / "b", train_set, optim_args="switch_rate=0.05")
    recorder = RecordLogs()
    resumed.add_callback(recorder)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-10"))
    for name, p in final_weights(resumed).items():
        torch.testing.assert_close(p, expected[name], rtol=1e-6, atol=1e-6)
    alphas = {log["step"]: log["dualadam_alpha"] for log in recorder.logs if "loss" in log}
    assert min(alphas) == 11 and alphas[11] == pytest.approx(1 - 0.05 * 11)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, train_set):
    """InvAdam's term is not scale-invariant: a wrongly scaled accumulated gradient would show here."""
    big = make_trainer(tmp_path / "big", train_set, per_device_train_batch_size=8, max_steps=5,
                       optim_args="switch_rate=0.01")
    big.train()
    small = make_trainer(tmp_path / "small", train_set, per_device_train_batch_size=2,
                         gradient_accumulation_steps=4, max_steps=5, optim_args="switch_rate=0.01")
    small.train()
    expected = final_weights(big)
    moved = max((p - q).abs().max().item() for p, q in zip(expected.values(), tiny_llama().parameters()))
    assert moved > 100 * 1e-6  # far beyond the tolerance below
    for name, p in final_weights(small).items():
        torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-6)


def test_evaluate_before_training_and_with_several_sets(tmp_path, train_set, eval_set):
    other = TokenDataset(6, seed=3)
    trainer = make_trainer(tmp_path, train_set, {"alpaca": eval_set, "other": other})
    metrics = trainer.evaluate()
    assert metrics["eval_alpaca_loss"] == pytest.approx(token_weighted_nll(trainer.model, eval_set), rel=1e-6)
    assert metrics["eval_other_loss"] == pytest.approx(token_weighted_nll(trainer.model, other), rel=1e-6)
    for name in ("alpaca", "other"):
        assert metrics[f"eval_{name}_gen_gap"] == pytest.approx(metrics[f"eval_{name}_loss"] - metrics["eval_train_loss"])


def test_evaluate_without_an_eval_set_says_so(tmp_path, train_set):
    with pytest.raises(ValueError, match="evaluation requires an eval_dataset"):
        make_trainer(tmp_path, train_set).evaluate()


def test_compute_metrics_is_refused(tmp_path, train_set):
    with pytest.raises(ValueError, match="computes its own metrics"):
        DualAdamTrainer(model=tiny_llama(), args=DualAdamTrainingArguments(**training_kwargs(tmp_path)),
                        train_dataset=train_set, compute_metrics=lambda p: {})

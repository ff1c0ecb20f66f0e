"""What both training apps print for ``--dry_run`` and before a run: the optimizer and the run's shape.

Each app adds its own model and data lines; the optimizer, batch, precision, evaluation and output
lines are these, read from the settled TrainingArguments (``optim_settings``), never re-parsed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dualadam_hf.hf.settings import LOW_BIT, has_schedule, settings_of
from dualadam_hf.optim import triton_backend
from dualadam_hf.optim.lowbit import DEFAULT_BLOCK_SIZE, QUANTIZE_MIN_NUMEL
from dualadam_hf.models.loading import first_line  # noqa: F401  (the apps' one-line errors)

# DualAdam's default switch_rate, said when a recipe leaves it out
DEFAULT_SWITCH_RATE = 8e-5


def optimizer_summary(args: Any) -> list[str]:
    """Lines describing the optimizer; for DualAdam, xi and the step at which alpha reaches 0 when known."""
    name = str(args.optim.value)
    lines = [
        f"optimizer:       {name}",
        f"  lr {args.learning_rate:g}, betas ({args.adam_beta1:g}, {args.adam_beta2:g}), eps {args.adam_epsilon:g}, "
        f"weight decay {args.weight_decay:g} (the Trainer exempts biases and LayerNorm/RMSNorm weights), "
        f"scheduler {args.lr_scheduler_type.value}",
    ]
    if getattr(args, "optim_settings", None) is None:
        return lines
    settings = settings_of(args)
    if name in LOW_BIT:
        block_size = settings.block_size or DEFAULT_BLOCK_SIZE[LOW_BIT[name]]
        rounding = ", bf16 weights rounded stochastically" if settings.bf16_stochastic_round else ""
        lines.append(f"  state: exp_avg and exp_avg_sq {LOW_BIT[name]} block-wise (block {block_size}; tensors under "
                     f"{QUANTIZE_MIN_NUMEL} elements keep the parameter's dtype), torchao{rounding}")
    if not has_schedule(name):
        return lines + ["  alpha = 1 at every step (pure InvAdam)"]
    if settings.schedule == "linear" and settings.switch_ratio is not None:
        ratio = settings.switch_ratio
        if args.max_steps > 0:
            xi = 1.0 / (ratio * args.max_steps)
            lines.append(f"  schedule linear, xi = {xi:.6g}: alpha reaches 0 at step {math.ceil(ratio * args.max_steps)}")
        else:
            lines.append(f"  schedule linear, switch_ratio {ratio:g}: alpha reaches 0 after {ratio:.0%} of the "
                         "optimizer steps (xi is set once the data, hence the run length, is known)")
    elif settings.schedule == "linear":
        xi = settings.switch_rate if settings.switch_rate is not None else DEFAULT_SWITCH_RATE
        reach = f"alpha reaches 0 at step {math.ceil(1.0 / xi)}" if xi > 0 else "alpha stays 1 (xi = 0)"
        lines.append(f"  schedule linear, xi = {xi:g}: {reach}")
    elif settings.schedule == "exponential":
        lines.append(f"  schedule exponential, alpha_t = {settings.switch_base}^t (reaches 0 only in the limit)")
    else:
        lines.append(f"  schedule step: alpha = 1 up to step {settings.switch_step}, then 0")
    if settings.inv_scale == "adam_rms":
        lines.append(
            "  inv_scale adam_rms: the InvAdam term is rescaled, per tensor, to the Adam term's norm (not in the paper)"
        )
    device_type = "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"
    return lines + [f"  step: {step_backend(name, settings.inv_scale, device_type)}"]


def step_backend(name: str, inv_scale: str, device_type: str) -> str:
    """Which backend steps the parameters of a run on ``device_type`` (DualAdam's ``_init_group`` decides for
    each tensor; this is what it decides for a model's ordinary ones)."""
    state_format = LOW_BIT.get(name)
    if device_type != "cuda":
        if state_format:
            return "on CPU, a compiled step per tensor"
        return "on CPU, foreach; the compiled kernel for param groups of 10M elements or more"
    kernels = triton_backend.available("cuda")
    if state_format:
        if state_format == "fp8" or not kernels or inv_scale == "adam_rms":
            return "a compiled step per tensor on CUDA"
        return "one Triton launch per param group and dtype on CUDA, over torchao's codes and scales"
    if not kernels:
        return "foreach on CUDA (the Triton kernel needs Triton and a GPU of compute capability 7.0 or more)"
    if inv_scale == "adam_rms":
        return "foreach on CUDA (inv_scale adam_rms needs each whole tensor's norm)"
    return "one Triton launch per param group and dtype on CUDA (torch's fused AdamW once alpha = 0)"


def run_lines(args: Any, unit: str) -> list[str]:
    """Batch (``unit``: what one example is, "examples" or "images"), precision, evaluation and output lines."""
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    run_length = f"max_steps {args.max_steps}" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
    precision = "bf16 mixed" if args.bf16 else "fp16 mixed" if args.fp16 else "fp32"
    evaluation = args.eval_strategy.value + (f" every {args.eval_steps} steps" if args.eval_strategy.value == "steps" else "")
    samples = getattr(args, "generation_eval_samples", 0)
    generation = (f"{samples} greedy answers per evaluation, at most {args.generation_max_new_tokens} new tokens "
                  "(eval_bleu, eval_rouge_l; output_dir/generations/)" if samples else "off")
    best = ""
    if getattr(args, "early_stopping_patience", None):
        best = (f"; early stopping after {args.early_stopping_patience} evaluations without a better "
                f"{args.metric_for_best_model}")
    if args.load_best_model_at_end:
        best += f"; the best checkpoint by {args.metric_for_best_model} is loaded at the end"
    return [
        f"batch:           {args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} "
        f"accumulation x {args.world_size} processes = {effective} {unit} per optimizer step; {run_length}",
        f"precision:       {precision}",
        f"evaluation:      {evaluation}{best}",
        f"generation:      {generation}",
        f"reporting to:    {', '.join(args.report_to) or 'none'}",
        f"output_dir:      {args.output_dir}",
    ]

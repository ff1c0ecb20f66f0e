"""Supervised fine-tuning of a causal LM on Alpaca-schema data with DualAdamTrainer.

``scripts/finetune.py`` is a thin wrapper around ``main``; everything worth testing lives here:
the argument dataclasses, the dry-run description, model loading (hub ids, ``trust_remote_code``
only when the recipe opts in, the built-in tiny Llama), LoRA, and the run itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dualadam_hf.hf.trainer import DualAdamTrainingArguments
from dualadam_hf.models.tiny import ALPACA_ZH_SAMPLE, TINY_LLAMA, is_builtin
from dualadam_hf.train.cli import RunArguments, script_main, train_and_save
from dualadam_hf.train.describe import optimizer_summary, run_lines
from dualadam_hf.train.sft_data import DataArguments

logger = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float16", "float32")
# The shipped Chinese sample, by name, so that recipes work from any directory.
BUILTIN_SAMPLE = "builtin:alpaca-zh-sample"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": f"Hub id or local directory of a causal LM, or {TINY_LLAMA!r} (built from a config, offline)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run the model's own Python files from its repository. Off unless the recipe says so; refused "
            "for openPangu-Embedded, which dualadam_hf loads natively."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": f"Weights' dtype when loading: one of {', '.join(DTYPES)}. The built-in tiny model is built in "
            "float32 and cast to it (auto: float32)."
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager, sdpa, flash_attention_2, ... (None: the model's default)."}
    )
    use_kernels: bool = field(
        default=False,
        metadata={
            "help": "Let transformers replace layers with compiled kernels from the Hugging Face Hub (the kernels "
            "package; fetched at the first training step on a GPU). Off by default: it downloads and runs code "
            "the recipe did not ask for, and fails offline."
        },
    )

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is required: a hub id, a local directory or " + TINY_LLAMA)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        from dualadam_hf.models.loading import check_hub_kernels

        check_hub_kernels(self.use_kernels)  # before anything is loaded, dry runs included


@dataclass
class LoraArguments:
    """PEFT LoRA, with TRL's field names."""

    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt (None: all linear layers but the output head)."}
    )

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


ARGUMENT_TYPES = (ModelArguments, DataArguments, LoraArguments, RunArguments, DualAdamTrainingArguments)


def describe(
    model_args: ModelArguments,
    data_args: DataArguments,
    lora_args: LoraArguments,
    training_args: DualAdamTrainingArguments,
) -> str:
    """The resolved configuration, as --dry_run prints it. Touches no weights and no data."""
    validation = (
        f"split {data_args.validation_split!r}"
        if data_args.validation_split
        else f"{data_args.validation_fraction:g} of {data_args.train_split!r} held out (seed {data_args.split_seed})"
    )
    check_packing(model_args, data_args)
    lines = [
        f"model:           {model_args.model_name_or_path} (trust_remote_code={model_args.trust_remote_code}, "
        f"dtype {model_args.dtype}, attention {model_args.attn_implementation or 'default'}, "
        f"hub kernels {'on' if model_args.use_kernels else 'off'}, "
        f"activation checkpointing {training_args.activation_checkpointing})",
        f"data:            {data_args.dataset_name}, train split {data_args.train_split!r}, validation {validation}, "
        f"max_seq_length {data_args.max_seq_length}",
        f"packing:         {packing_line(model_args, data_args)}",
        "peft:            "
        + (
            f"LoRA r={lora_args.lora_r} alpha={lora_args.lora_alpha} dropout={lora_args.lora_dropout} "
            f"targets={lora_args.lora_target_modules or 'all-linear'}"
            if lora_args.use_peft
            else "none (full fine-tuning)"
        ),
        *optimizer_summary(training_args),
        *run_lines(training_args, "examples"),
    ]
    return "\n".join(lines)


def check_packing(model_args: ModelArguments, data_args: DataArguments) -> None:
    """An attention implementation named in the recipe that cannot keep packed examples apart is refused before
    anything loads; the model itself is checked once loaded (``prepare_for_packing``)."""
    from dualadam_hf.hf.packing import check_attention

    if data_args.packing:
        check_attention(model_args.attn_implementation)


def packing_line(model_args: ModelArguments, data_args: DataArguments) -> str:
    if not data_args.packing:
        return "off (each batch right-padded to its longest example)"
    attention = model_args.attn_implementation
    how = (
        "packed_sdpa: torch's varlen FlashAttention kernel once per row on CUDA (bf16/fp16), SDPA on each "
        "example elsewhere"
        if attention in (None, "sdpa", "packed_sdpa")
        else f"{attention}, kept apart by {'the example boundaries' if attention.startswith('flash') else 'a block-diagonal mask'}"
    )
    if attention is None:
        how += " unless the model's default attention is not SDPA"
    return f"on (padding-free batches for training and evaluation; attention: {how}; use_cache off)"


def resolve_dataset_name(data_args: DataArguments) -> None:
    if data_args.dataset_name == BUILTIN_SAMPLE:
        data_args.dataset_name = str(ALPACA_ZH_SAMPLE)


def load_model_and_tokenizer(model_args: ModelArguments, seed: int) -> tuple[Any, Any]:
    """The hub/local path for real models; the built-in tiny Llama and its shipped tokenizer offline."""
    import torch

    from dualadam_hf.models.tiny import build_tiny_llama, load_tiny_tokenizer

    if is_builtin(model_args.model_name_or_path):
        tokenizer = load_tiny_tokenizer()
        model = build_tiny_llama(tokenizer, seed=seed)
        if model_args.dtype != "auto":  # as a hub model loaded with this dtype: weights, optimizer state, compute
            model.to(getattr(torch, model_args.dtype))
        if model_args.attn_implementation is not None:
            model.set_attn_implementation(model_args.attn_implementation)
        model.use_kernels = model_args.use_kernels  # built from a config: transformers' default does not apply
        return model, tokenizer

    from dualadam_hf.models.loading import load_causal_lm

    return load_causal_lm(
        model_args.model_name_or_path,
        trust_remote_code=model_args.trust_remote_code,
        dtype=model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype),
        attn_implementation=model_args.attn_implementation,
        use_kernels=model_args.use_kernels,
    )


def apply_lora(model: Any, lora_args: LoraArguments) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_args.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    lora_args: LoraArguments,
    training_args: DualAdamTrainingArguments,
) -> dict[str, float]:
    """Load, prepare, train, evaluate, save. Data problems stop the run before anything is written."""
    resolve_dataset_name(data_args)
    from dualadam_hf.hf.checkpoints import free_space_warning
    from dualadam_hf.hf.packing import packed_collator, prepare_for_packing
    from dualadam_hf.hf.trainer import DualAdamTrainer
    from dualadam_hf.train.sft_data import SFTCollator, prepare_datasets

    model, tokenizer = load_model_and_tokenizer(model_args, seed=training_args.seed)
    if data_args.packing:
        logger.warning("packing: padding-free batches, attention %s", prepare_for_packing(model))
    data = prepare_datasets(data_args, tokenizer)
    logger.warning("data: %s", data.summary())
    if training_args.activation_checkpointing:
        model.config.use_cache = False
    if lora_args.use_peft:
        model = apply_lora(model, lora_args)

    trainer = DualAdamTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=packed_collator() if data_args.packing else SFTCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    shortfall = free_space_warning(training_args, trainer.model)  # the parameter count is known from here on
    if shortfall and training_args.should_save:
        logger.warning("warning: %s", shortfall)
    return train_and_save(
        trainer,
        training_args,
        evaluations=[("eval", None)],
        extra_train_metrics=dict(
            train_truncated_examples=data.num_truncated_train, eval_truncated_examples=data.num_truncated_eval
        ),
        run_kind="causal_lm",
        run_details=dict(
            model=model_args.model_name_or_path,
            use_peft=lora_args.use_peft,
            # what scripts/flatness.py needs to rebuild the same training examples
            dataset=data_args.dataset_name,
            train_split=data_args.train_split,
            validation_split=data_args.validation_split,
            validation_fraction=data_args.validation_fraction,
            split_seed=data_args.split_seed,
            max_seq_length=data_args.max_seq_length,
            packing=data_args.packing,
        ),
    )


def resume_details(
    model_args: ModelArguments,
    data_args: DataArguments,
    lora_args: LoraArguments,
    training_args: DualAdamTrainingArguments,
) -> dict[str, Any]:
    """What a checkpoint's state depends on besides the optimizer's settings (``dualadam_hf.hf.resume``)."""
    from dualadam_hf.hf.resume import data_fingerprint

    dataset = str(ALPACA_ZH_SAMPLE) if data_args.dataset_name == BUILTIN_SAMPLE else data_args.dataset_name
    peft = (f"LoRA r={lora_args.lora_r} alpha={lora_args.lora_alpha} dropout={lora_args.lora_dropout} "
            f"targets={lora_args.lora_target_modules or 'all-linear'}" if lora_args.use_peft else "none")
    return dict(model=model_args.model_name_or_path, dtype=model_args.dtype, peft=peft,
                dataset=data_fingerprint(dataset), train_split=data_args.train_split,
                max_seq_length=data_args.max_seq_length, max_train_samples=data_args.max_train_samples,
                packing=data_args.packing)


def main(argv: Sequence[str] | None = None, *, prog: str = "finetune.py", description: str = "") -> int:
    return script_main(ARGUMENT_TYPES, argv, prog=prog, description=description, describe=describe, run=run,
                       resume_details=resume_details)

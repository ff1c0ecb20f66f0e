"""Image classification with DualAdamTrainer: the paper's CIFAR experiments and an offline stand-in.

``scripts/train_vision.py`` is a thin wrapper around ``main``; everything worth testing lives here: the
argument dataclass, the dry-run description, loading the splits, and the run itself. It follows
``dualadam_hf.train.finetune`` step for step (sharing ``cli`` and ``describe`` with it) (same recipe parsing, same ``optim`` names, same Trainer and
metrics), so that the vision runs and the LLM runs differ only in model and data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dualadam_hf.hf.trainer import DualAdamTrainingArguments
from dualadam_hf.train.cli import DataError, RunArguments, script_main, train_and_save
from dualadam_hf.train.describe import first_line, optimizer_summary, run_lines
from dualadam_hf.train.vision.augment import AUGMENTATION_KINDS
from dualadam_hf.train.vision.models import BACKBONES

logger = logging.getLogger(__name__)

# scikit-learn's bundled 8×8 digits: no download, so the default recipe and the tests run offline.
DIGITS = "sklearn:digits"
# What the dry run can say without loading anything; other hub datasets' classes come from their ClassLabel.
KNOWN_NUM_CLASSES = {"uoft-cs/cifar100": 100, "uoft-cs/cifar10": 10, DIGITS: 10}
AUGMENTATION_DESCRIPTIONS = {
    "cifar": "random crop with 4 pixels of zero padding + horizontal flip",
    "none": "none",
}


@dataclass
class VisionArguments:
    model_name: str = field(
        default="resnet18_cifar", metadata={"help": f"Backbone: one of {', '.join(BACKBONES)}."}
    )
    dataset_name: str = field(
        default="uoft-cs/cifar100",
        metadata={
            "help": f"A hub image-classification dataset with a train and a test split (uoft-cs/cifar100, "
            f"uoft-cs/cifar10), or {DIGITS!r} (bundled with scikit-learn, offline)."
        },
    )
    augmentation: str = field(
        default="cifar",
        metadata={
            "help": f"Training-time augmentation, run inside the model: one of {', '.join(AUGMENTATION_KINDS)}. "
            "Inputs are always normalized with the training split's per-channel statistics."
        },
    )
    validation_size: int = field(
        default=5000,
        metadata={
            "help": "Hub datasets: images of the train split held out for validation; the test split stays "
            f"the test set. {DIGITS} always splits 70/15/15 into train/validation/test."
        },
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/validation(/test) split."})

    def __post_init__(self) -> None:
        if self.model_name not in BACKBONES:
            raise ValueError(f"model_name must be one of {', '.join(BACKBONES)}, got {self.model_name!r}")
        if self.augmentation not in AUGMENTATION_KINDS:
            raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATION_KINDS)}, got {self.augmentation!r}")
        if ":" in self.dataset_name and self.dataset_name != DIGITS:
            raise ValueError(f"dataset_name {self.dataset_name!r}: the only built-in dataset is {DIGITS!r}")
        if self.model_name == "digits_net" and self.dataset_name != DIGITS:
            raise ValueError(f"digits_net takes 8x8 single-channel images ({DIGITS}); use resnet18_cifar")
        if self.validation_size < 1:
            raise ValueError(f"validation_size must be >= 1, got {self.validation_size}")


ARGUMENT_TYPES = (VisionArguments, RunArguments, DualAdamTrainingArguments)


def resume_details(vision_args: VisionArguments, training_args: DualAdamTrainingArguments) -> dict[str, Any]:
    """What a checkpoint's state depends on besides the optimizer's settings (``dualadam_hf.hf.resume``)."""
    return dict(model=vision_args.model_name, dataset=vision_args.dataset_name, augmentation=vision_args.augmentation,
                validation_size=vision_args.validation_size, split_seed=vision_args.split_seed)


def describe(vision_args: VisionArguments, training_args: DualAdamTrainingArguments) -> str:
    """The resolved configuration, as --dry_run prints it. Touches no data."""
    num_classes = KNOWN_NUM_CLASSES.get(vision_args.dataset_name)
    classes = f"{num_classes} classes" if num_classes else "classes read from the dataset's ClassLabel"
    if vision_args.dataset_name == DIGITS:
        splits = f"train/validation/test 70/15/15 % (seed {vision_args.split_seed}), offline"
    else:
        splits = (
            f"validation {vision_args.validation_size} images of the hub's train split (seed "
            f"{vision_args.split_seed}), test the hub's test split"
        )
    schedule = training_args.lr_scheduler_type.value
    if training_args.lr_scheduler_kwargs:
        schedule += " " + ", ".join(f"{key} {value}" for key, value in training_args.lr_scheduler_kwargs.items())
    lines = [
        f"model:           {vision_args.model_name}, augmentation "
        f"{AUGMENTATION_DESCRIPTIONS[vision_args.augmentation]}",
        f"data:            {vision_args.dataset_name}, {classes}; {splits}",
        *optimizer_summary(training_args),
        f"lr schedule:     {schedule}, warm-up {training_args.warmup_steps:g} steps",
        *run_lines(training_args, "images"),
    ]
    return "\n".join(lines)


def load_splits(vision_args: VisionArguments) -> Any:
    """The ImageSplits of the recipe's dataset; a hub or data problem becomes a one-line DataError."""
    from dualadam_hf.train.vision.data import load_cifar_splits, load_digits_splits

    if vision_args.dataset_name == DIGITS:
        return load_digits_splits(seed=vision_args.split_seed)
    try:
        return load_cifar_splits(vision_args.dataset_name, vision_args.validation_size, vision_args.split_seed)
    except (OSError, ValueError) as error:  # no network, no such dataset, no image/label column, too few images
        raise DataError(f"cannot load dataset {vision_args.dataset_name!r}: {first_line(error)}") from None


def run(vision_args: VisionArguments, training_args: DualAdamTrainingArguments) -> dict[str, float]:
    """Load, train, evaluate on validation and test, save. A data problem stops the run before anything is written."""
    from transformers import default_data_collator, set_seed

    from dualadam_hf.hf.trainer import DualAdamTrainer
    from dualadam_hf.train.vision.models import build_vision_model

    splits = load_splits(vision_args)
    logger.warning(
        "data: %s, %d classes, %d train / %d validation / %d test images",
        vision_args.dataset_name, splits.num_classes, len(splits.train), len(splits.validation), len(splits.test),
    )
    set_seed(training_args.seed)  # the initial weights; the Trainer seeds again, too late for them
    model = build_vision_model(
        vision_args.model_name, splits.num_classes, splits.mean, splits.std, vision_args.augmentation
    )
    trainer = DualAdamTrainer(
        model=model,
        args=training_args,
        train_dataset=splits.train,
        eval_dataset=splits.validation,
        data_collator=default_data_collator,
    )
    # The test split is measured once, after training; nothing during the run looks at it.
    return train_and_save(
        trainer,
        training_args,
        evaluations=[("eval", None), ("test", splits.test)],
        run_kind="vision",
        run_details=dict(
            model=vision_args.model_name,
            dataset=vision_args.dataset_name,
            num_classes=splits.num_classes,
            augmentation=vision_args.augmentation,
            split_seed=vision_args.split_seed,
            # the digits split is a fixed 70/15/15; validation_size is the hub datasets' only
            **({} if vision_args.dataset_name == DIGITS else {"validation_size": vision_args.validation_size}),
        ),
    )


def main(argv: Sequence[str] | None = None, *, prog: str = "train_vision.py", description: str = "") -> int:
    return script_main(ARGUMENT_TYPES, argv, prog=prog, description=description, describe=describe, run=run,
                       resume_details=resume_details)

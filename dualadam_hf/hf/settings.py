"""``TrainingArguments.optim_args`` for DualAdam and InvAdam, parsed once into ``OptimSettings``.

Transformers hands ``optim_args`` over as one string, ``"key=value,key=value"``; every value is a string
there. ``OptimSettings.from_training_args`` gives each key its type, refuses unknown keys by name, checks
what the optimizer would refuse at construction, and returns a frozen object. ``DualAdamTrainingArguments``
does this in ``__post_init__`` and keeps the result; the optimizer handler, ``DualAdamTrainer`` and the
scripts' descriptions read it (``settings_of``). ``switch_ratio`` (the fraction of the run after which
alpha reaches 0) becomes a ``switch_rate`` once the run's length is known. The low-bit optimizers
(``dualadam_8bit``, ...) take DualAdam's keys and torchao's ``block_size`` and ``bf16_stochastic_round``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dualadam_hf.hf.launch import sharding_of
from dualadam_hf.optim import DualAdam, DualAdam4bit, DualAdam8bit, InvAdam, InvAdam4bit, InvAdam8bit
from dualadam_hf.optim.kernels import INV_SCALES, SCHEDULES, check_hyperparameters, check_schedule
from dualadam_hf.optim.lowbit import check_block_size, missing_dependency

# optim name -> class; hf.registration adds these names to transformers
OPTIMIZERS: dict[str, type[DualAdam]] = {
    "dualadam": DualAdam,
    "invadam": InvAdam,
    "dualadam_8bit": DualAdam8bit,
    "dualadam_4bit": DualAdam4bit,
    "invadam_8bit": InvAdam8bit,
    "invadam_4bit": InvAdam4bit,
}
# optim name -> state format ("8bit", "4bit"), for the low-bit ones: what their classes say
LOW_BIT = {name: cls.state_format for name, cls in OPTIMIZERS.items() if getattr(cls, "state_format", "")}


def _float(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return number


def _int(value: str) -> int:
    return int(value)


def _bool(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError(value)
    return value.lower() == "true"


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(value)
        return value

    return parse


# key -> (parser, description of the expected value)
DUALADAM_KEYS: dict[str, tuple[Callable[[str], Any], str]] = {
    "switch_rate": (_float, "a finite float >= 0"),
    "switch_ratio": (_float, "a float in (0, 1]"),
    "schedule": (_one_of(SCHEDULES), f"one of {', '.join(SCHEDULES)}"),
    "switch_base": (_float, "a float in (0, 1]"),
    "switch_step": (_int, "an integer >= 0"),
    "inv_scale": (_one_of(INV_SCALES), f"one of {', '.join(INV_SCALES)}"),
}
# keys that mean something for one schedule only
SCHEDULE_KEYS = {
    "switch_rate": ("linear",),
    "switch_ratio": ("linear",),
    "switch_base": ("exponential",),
    "switch_step": ("step",),
}
LOW_BIT_KEYS: dict[str, tuple[Callable[[str], Any], str]] = {
    "block_size": (_int, "a positive integer (even for 4-bit state)"),
    "bf16_stochastic_round": (_bool, "true or false"),
}
KEYS_BY_OPTIMIZER: dict[str, dict[str, tuple[Callable[[str], Any], str]]] = {
    "dualadam": DUALADAM_KEYS,
    "invadam": {},
    "dualadam_8bit": DUALADAM_KEYS | LOW_BIT_KEYS,
    "dualadam_4bit": DUALADAM_KEYS | LOW_BIT_KEYS,
    "invadam_8bit": LOW_BIT_KEYS,
    "invadam_4bit": LOW_BIT_KEYS,
}


def split_optim_args(optim_args: str | None) -> dict[str, str]:
    """``"a=1, b=2"`` -> ``{"a": "1", "b": "2"}``, with a clear message for a malformed item."""
    pairs: dict[str, str] = {}
    if not optim_args:
        return pairs
    for item in optim_args.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"optim_args: {item!r} is not of the form key=value")
        pairs[key.strip()] = value.strip()
    return pairs


@dataclass(frozen=True)
class OptimSettings:
    """DualAdam's or InvAdam's ``optim_args``, typed and checked; ``None`` means the optimizer's default."""

    optimizer: str
    optim_args: str | None = None  # the text these were parsed from
    schedule: str = "linear"
    switch_rate: float | None = None
    switch_ratio: float | None = None
    switch_base: float | None = None
    switch_step: int | None = None
    inv_scale: str = "none"
    block_size: int | None = None
    bf16_stochastic_round: bool | None = None

    @classmethod
    def parse(cls, optimizer: str, optim_args: str | None) -> OptimSettings:
        """Typed settings for ``optimizer`` (a name of ``OPTIMIZERS``); every refusal names the key."""
        keys = KEYS_BY_OPTIMIZER[optimizer]
        parsed: dict[str, Any] = {}
        for key, raw in split_optim_args(optim_args).items():
            if key not in keys:
                valid = ", ".join(sorted(keys)) if keys else "none"
                raise ValueError(f"optim_args: unknown key {key!r} for optim={optimizer}; valid keys: {valid}")
            parser, expected = keys[key]
            try:
                parsed[key] = parser(raw)
            except ValueError:
                raise ValueError(f"optim_args: {key}={raw!r} is not {expected}") from None
        schedule = parsed.get("schedule", "linear")
        for key in parsed:
            if key in SCHEDULE_KEYS and schedule not in SCHEDULE_KEYS[key]:
                raise ValueError(
                    f"optim_args: {key} applies to schedule={SCHEDULE_KEYS[key][0]} only (schedule is {schedule})"
                )
        if "switch_ratio" in parsed:
            ratio = parsed["switch_ratio"]
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"optim_args: switch_ratio={ratio} is not a float in (0, 1]")
            if "switch_rate" in parsed:
                raise ValueError("optim_args: give switch_rate or switch_ratio, not both")
        settings = cls(optimizer=optimizer, optim_args=optim_args, **parsed)
        check_schedule(settings.schedule, settings.switch_rate or 0.0, settings.switch_base, settings.switch_step)
        if settings.block_size is not None:
            try:
                check_block_size(settings.block_size, LOW_BIT[optimizer], OPTIMIZERS[optimizer].__name__)
            except ValueError:
                expected = LOW_BIT_KEYS["block_size"][1]
                raise ValueError(f"optim_args: block_size={settings.block_size} is not {expected}") from None
        return settings

    @classmethod
    def from_training_args(cls, args: Any) -> OptimSettings:
        """Everything DualAdam/InvAdam would refuse at construction, checked from TrainingArguments, so that
        a dry run refuses it too and a real run does not fail after loading the model and the data."""
        optimizer = str(args.optim.value)
        name = OPTIMIZERS[optimizer].__name__
        if optimizer in LOW_BIT:
            refusal = low_bit_refusal(optimizer, sharding_of(args))
            if refusal is not None:
                raise ValueError(f"optim: {refusal}")
        check_hyperparameters(
            args.learning_rate, (args.adam_beta1, args.adam_beta2), args.adam_epsilon, args.weight_decay, name
        )
        settings = cls.parse(optimizer, args.optim_args)
        refusal = inv_scale_on_shards(settings.inv_scale, sharding_of(args))
        if refusal is not None:
            raise ValueError(f"optim_args: {refusal}")
        return settings

    def optimizer_kwargs(self, total_steps: int | None) -> dict[str, Any]:
        """The keyword arguments the settings give the optimizer, with switch_ratio turned into switch_rate
        (``1 / (switch_ratio * total_steps)``)."""
        scheduled = has_schedule(self.optimizer)
        kwargs: dict[str, Any] = dict(schedule=self.schedule, inv_scale=self.inv_scale) if scheduled else {}
        for key in ("switch_rate", "switch_base", "switch_step", "block_size", "bf16_stochastic_round"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        if self.switch_ratio is not None:
            if not total_steps or total_steps <= 0:
                raise ValueError(
                    "optim_args: switch_ratio needs the run's total number of optimizer steps; "
                    "use DualAdamTrainer (which knows it) or set max_steps"
                )
            kwargs["switch_rate"] = 1.0 / (self.switch_ratio * total_steps)
        return kwargs


def has_schedule(optimizer: str) -> bool:
    """Whether ``optimizer`` (a name of ``OPTIMIZERS``) blends on an alpha schedule: DualAdam's family, not
    InvAdam's (alpha = 1 at every step)."""
    return "schedule" in KEYS_BY_OPTIMIZER[optimizer]


def settings_of(args: Any) -> OptimSettings:
    """The settings ``DualAdamTrainingArguments`` parsed at construction, or, for a stock TrainingArguments
    (or optim / optim_args changed since), parsed and checked now."""
    settings = getattr(args, "optim_settings", None)
    if settings is not None and (settings.optimizer, settings.optim_args) == (str(args.optim.value), args.optim_args):
        return settings
    return OptimSettings.from_training_args(args)


def settle(args: Any) -> tuple[OptimSettings | None, str]:
    """Settle a TrainingArguments' optimizer settings once: ``(settings, note)``.

    For ours (``OPTIMIZERS``), the checked settings. For an optimizer without a schedule, DualAdam's own
    keys are dropped from ``optim_args`` (a DualAdam recipe run with ``--optim adamw_torch`` is the baseline
    users ask for, and ``switch_ratio`` means nothing there), and the note says so.
    """
    optimizer = str(args.optim.value)
    pairs = split_optim_args(args.optim_args)
    note = ""
    takes_them = set(pairs) <= set(KEYS_BY_OPTIMIZER.get(optimizer, {}))
    if pairs and set(pairs) <= set(DUALADAM_KEYS) and not takes_them:
        note = f"optim_args {args.optim_args!r} are DualAdam's; not used by {optimizer}"
        args.optim_args = None
    settings = OptimSettings.from_training_args(args) if optimizer in KEYS_BY_OPTIMIZER else None
    return settings, note


def inv_scale_on_shards(inv_scale: str, sharding: str | None) -> str | None:
    """Why ``inv_scale`` cannot run under ``sharding`` ("DeepSpeed", "FSDP"), or None where it can."""
    if inv_scale == "none" or sharding is None:
        return None
    return (
        f"inv_scale={inv_scale} rescales per whole tensor, but {sharding} hands the optimizer shards of tensors; "
        "remove inv_scale or train without sharding (DDP is fine)"
    )


def low_bit_refusal(optimizer: str, sharding: str | None) -> str | None:
    """Why the low-bit ``optimizer`` cannot run here (torchao missing, DeepSpeed), or None where it can."""
    missing = missing_dependency()
    if missing is not None:
        return f"{optimizer} needs torchao: {missing}"
    if sharding == "DeepSpeed":
        return (
            f"{optimizer} keeps its state quantized per tensor, but DeepSpeed ZeRO hands the optimizer flat "
            "partitions of many tensors; use DDP or FSDP2 (recipes/accelerate/ddp.yaml, fsdp.yaml), or optim=dualadam"
        )
    return None

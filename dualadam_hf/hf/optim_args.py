"""Typed parsing of ``TrainingArguments.optim_args`` for DualAdam and InvAdam.

Transformers hands ``optim_args`` over as one string, ``"key=value,key=value"``; every value is a string
there. Here each key gets its type, unknown keys are refused by name, and ``switch_ratio`` (the fraction
of the run after which alpha reaches 0) is turned into a ``switch_rate`` once the run's length is known.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dualadam_hf.hf.launch import sharding_of
from dualadam_hf.optimizer import INV_SCALES, SCHEDULES, check_hyperparameters, check_schedule


def _float(value: str) -> float:
    return float(value)


def _int(value: str) -> int:
    return int(value)


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(value)
        return value

    return parse


# key -> (parser, description of the expected value)
DUALADAM_KEYS: dict[str, tuple[Callable[[str], Any], str]] = {
    "switch_rate": (_float, "a float >= 0"),
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
KEYS_BY_OPTIMIZER: dict[str, dict[str, tuple[Callable[[str], Any], str]]] = {
    "dualadam": DUALADAM_KEYS,
    "invadam": {},
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


def parse_optim_args(optimizer: str, optim_args: str | None) -> dict[str, Any]:
    """Typed keyword arguments for ``optimizer`` ("dualadam" or "invadam"), switch_ratio left unresolved."""
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
            raise ValueError(f"optim_args: {key} applies to schedule={SCHEDULE_KEYS[key][0]} only (schedule is {schedule})")
    if "switch_ratio" in parsed:
        ratio = parsed["switch_ratio"]
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"optim_args: switch_ratio={ratio} is not a float in (0, 1]")
        if "switch_rate" in parsed:
            raise ValueError("optim_args: give switch_rate or switch_ratio, not both")
    return parsed


def resolve_switch_ratio(kwargs: dict[str, Any], total_steps: int | None) -> dict[str, Any]:
    """Replace ``switch_ratio`` by ``switch_rate = 1 / (switch_ratio * total_steps)``."""
    if "switch_ratio" not in kwargs:
        return kwargs
    if not total_steps or total_steps <= 0:
        raise ValueError(
            "optim_args: switch_ratio needs the run's total number of optimizer steps; "
            "use DualAdamTrainer (which knows it) or set max_steps"
        )
    resolved = dict(kwargs)
    ratio = resolved.pop("switch_ratio")
    resolved["switch_rate"] = 1.0 / (ratio * total_steps)
    return resolved


def check_optimizer_settings(optimizer: str, args: Any) -> None:
    """Everything DualAdam/InvAdam would refuse at construction, checked now from TrainingArguments, so
    that a dry run refuses it too and a real run does not fail after loading the model and the data."""
    name = "DualAdam" if optimizer == "dualadam" else "InvAdam"
    check_hyperparameters(
        args.learning_rate, (args.adam_beta1, args.adam_beta2), args.adam_epsilon, args.weight_decay, name
    )
    extra = parse_optim_args(optimizer, args.optim_args)
    check_schedule(extra.get("schedule", "linear"), extra.get("switch_rate", 0.0), extra.get("switch_base"),
                   extra.get("switch_step"))
    check_inv_scale_placement(extra, args)


def check_inv_scale_placement(extra: dict[str, Any], args: Any) -> None:
    """Refuse ``inv_scale`` where the optimizer would rescale shards instead of whole tensors."""
    refusal = inv_scale_on_shards(extra.get("inv_scale", "none"), sharding_of(args))
    if refusal is not None:
        raise ValueError(f"optim_args: {refusal}")


def inv_scale_on_shards(inv_scale: str, sharding: str | None) -> str | None:
    """Why ``inv_scale`` cannot run under ``sharding`` ("DeepSpeed", "FSDP"), or None where it can."""
    if inv_scale == "none" or sharding is None:
        return None
    return (
        f"inv_scale={inv_scale} rescales per whole tensor, but {sharding} hands the optimizer shards of tensors; "
        "remove inv_scale or train without sharding (DDP is fine)"
    )

"""What ``accelerate launch`` tells a training process through its environment, and what must agree with it.

Read before any weights are loaded, so that a launch configuration that cannot work with the recipe
is refused in one line by the dry run and by a real run alike, instead of by DeepSpeed once the model
is wrapped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PRECISIONS = ("no", "fp16", "bf16")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def sharding_of(args: Any) -> str | None:
    """"DeepSpeed" or "FSDP" when the run hands the optimizer sharded tensors, from TrainingArguments or
    from the environment ``accelerate launch`` sets for its config; None otherwise."""
    if getattr(args, "deepspeed", None) or env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    if getattr(args, "fsdp", None) or env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return None


def recipe_precision(args: Any) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "no"


def _deepspeed_json_precision(deepspeed: Any) -> str | None:
    """The precision a DeepSpeed JSON (path or dict) enables explicitly; None where it leaves it to "auto"."""
    config = deepspeed if isinstance(deepspeed, dict) else json.loads(Path(deepspeed).read_text(encoding="utf-8"))
    enabled = [name for name in ("bf16", "fp16") if (config.get(name) or {}).get("enabled") is True]
    explicit = [name for name in ("bf16", "fp16") if isinstance((config.get(name) or {}).get("enabled"), bool)]
    if enabled:
        return enabled[0]
    return "no" if explicit else None


def check_deepspeed_precision(args: Any) -> None:
    """DeepSpeed refuses to start when its precision and the recipe's differ (after the model is loaded, in
    a many-line traceback from every rank). Say which two settings disagree and what fixes it, now."""
    if getattr(args, "deepspeed", None):
        try:
            launched = _deepspeed_json_precision(args.deepspeed)
        except (OSError, ValueError, AttributeError):
            return  # transformers reports an unreadable DeepSpeed config itself
        where = "the DeepSpeed config"
        fix = "set bf16/fp16 \"enabled\" to \"auto\" in the DeepSpeed config"
    elif env_flag("ACCELERATE_USE_DEEPSPEED"):
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
        where = "the accelerate launch config"
        fix = f"launch with --mixed_precision {recipe_precision(args)}"
    else:
        return
    recipe = recipe_precision(args)
    if launched not in PRECISIONS or launched == recipe:
        return
    recipe_fix = "remove bf16/fp16 from the recipe" if launched == "no" else f"set {launched}: true in the recipe"
    raise ValueError(
        f"precision: {where} sets mixed_precision={launched} but the recipe trains in "
        f"{'fp32' if recipe == 'no' else recipe}, and DeepSpeed needs the two to agree: {fix}, or {recipe_fix}"
    )

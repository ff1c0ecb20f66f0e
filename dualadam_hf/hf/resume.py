"""A resume continues the recipe its checkpoint was saved with, or says what changed.

Each checkpoint carries ``run_settings.json``: the settings its state depends on (the optimizer and its
arguments, the learning rate and its schedule, betas, weight decay, the batch per optimizer step, the run's
length where ``switch_ratio`` reads it, precision, and what the training script adds: model, PEFT, data).
A resume compares them with the new run's (``check_resume``, in pre-flight) and refuses any difference in one
line, ``key: old -> new`` for each, unless ``resume_accept_changes`` names the key. An accepted change is
applied (``apply_accepted_changes``, once the checkpoint's optimizer and scheduler are loaded: the Trainer
would otherwise restore the old values over the new ones) and recorded with the step it took effect.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from dualadam_hf.hf.settings import split_optim_args

RUN_SETTINGS = "run_settings.json"
# Settings no resume can change: the checkpoint's optimizer state, weights and adapter are laid out for them.
FIXED = ("optim", "block_size", "model", "peft")
# With resume_weights_only the optimizer and its schedule start afresh: only what the weights are checked.
WEIGHTS = ("model", "peft")
# TrainingArguments whose values an optimizer group holds; put back after the checkpoint's groups are loaded.
GROUP_KEYS = ("weight_decay", "betas", "eps", "switch_rate", "schedule", "switch_base", "switch_step", "inv_scale",
              "bf16_stochastic_round")


def optimizer_settings(args: Any) -> dict[str, Any]:
    """The settings of a TrainingArguments that a checkpoint's optimizer and scheduler state depend on."""
    optim_args = split_optim_args(args.optim_args)
    settings: dict[str, Any] = {
        "optim": str(getattr(args.optim, "value", args.optim)),
        **{key: _number(value) for key, value in sorted(optim_args.items())},
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "lr_scheduler_kwargs": args.lr_scheduler_kwargs or {},
        "warmup_steps": args.warmup_steps,
        "adam_beta1": args.adam_beta1,
        "adam_beta2": args.adam_beta2,
        "adam_epsilon": args.adam_epsilon,
        "weight_decay": args.weight_decay,
        "batch": f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps} x {args.world_size}",
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
    }
    if "switch_ratio" in optim_args:  # xi = 1 / (switch_ratio * total steps): the run's length sets it
        settings["run_length"] = (f"{args.max_steps} steps" if args.max_steps > 0
                                  else f"{args.num_train_epochs:g} epochs")
    return settings


def _number(text: str) -> Any:
    """optim_args values as numbers where they are, so that 1e-3 and 0.001 are one value."""
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def run_settings(args: Any) -> dict[str, Any]:
    """What this run's checkpoints record: the optimizer's settings and the script's (``args.run_details``)."""
    return {**optimizer_settings(args), **(getattr(args, "run_details", None) or {})}


def write_run_settings(checkpoint: str | Path, args: Any) -> None:
    record = {"settings": run_settings(args), "changes": getattr(args, "resume_changes", None) or []}
    Path(checkpoint, RUN_SETTINGS).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_run_settings(checkpoint: str | Path) -> dict[str, Any] | None:
    """The checkpoint's record, or None for a checkpoint written without one (older versions, plain HF)."""
    path = Path(checkpoint, RUN_SETTINGS)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ValueError(f"resume_from_checkpoint {checkpoint}: {RUN_SETTINGS} is not readable JSON") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise ValueError(f"resume_from_checkpoint {checkpoint}: {RUN_SETTINGS} holds no settings")
    return record


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        return math.isclose(old, new, rel_tol=1e-12, abs_tol=0.0)
    return old == new


def _shown(value: Any) -> str:
    return "(unset)" if value is None else value if isinstance(value, str) else json.dumps(value)


def check_resume(args: Any) -> str:
    """Compare the settled checkpoint's record with this run's; refuse changes not accepted, one line. Sets
    ``args.resume_changes`` (the record's history plus the changes accepted now, each with the checkpoint's
    step) and returns a note for the printed configuration."""
    checkpoint = args.resume_from_checkpoint
    accepted = [key.strip() for item in (args.resume_accept_changes or []) for key in str(item).split(",")
                if key.strip()]
    if checkpoint is None:
        if accepted:
            raise ValueError("resume_accept_changes: only for a run that resumes (set resume_from_checkpoint)")
        return ""
    record = read_run_settings(checkpoint)
    if record is None:
        args.resume_changes = []
        return f"{Path(checkpoint).name} records no settings (saved by an older version or another trainer): not checked"
    old, new, step = record["settings"], run_settings(args), checkpoint_step(checkpoint)
    compared = WEIGHTS if args.resume_weights_only else sorted(set(old) | set(new))
    unknown = [key for key in accepted if key not in old and key not in new]
    if unknown:
        raise ValueError(f"resume_accept_changes: {unknown[0]!r} is not a recorded setting; recorded: "
                         f"{', '.join(sorted(set(old) | set(new)))}")
    # the run's length matters while both recipes turn switch_ratio into xi with it
    compared = [key for key in compared if key != "run_length" or (key in old and key in new)]
    changed = [key for key in compared if not _same(old.get(key), new.get(key))]
    fixed = [key for key in changed if key in FIXED]
    if fixed:
        shown = "; ".join(f"{key}: {_shown(old.get(key))} -> {_shown(new.get(key))}" for key in fixed)
        raise ValueError(f"resume_from_checkpoint {checkpoint}: {shown} cannot change on resume (the checkpoint's "
                         "state is laid out for it); start a new run"
                         + ("" if args.resume_weights_only or set(fixed) & set(WEIGHTS)
                            else ", or set resume_weights_only: true for a fresh optimizer"))
    refused = [key for key in changed if key not in accepted]
    if refused:
        shown = "; ".join(f"{key}: {_shown(old.get(key))} -> {_shown(new.get(key))}" for key in refused)
        raise ValueError(f"resume_from_checkpoint {checkpoint}: the recipe changed since it was saved ({shown}); "
                         f"to apply the change from step {step}, set resume_accept_changes: {','.join(refused)}")
    now = [{"key": key, "old": old.get(key), "new": new.get(key), "step": step} for key in changed]
    args.resume_changes = list(record.get("changes", [])) + now
    unused = [key for key in accepted if key not in changed]
    notes = [f"applying from step {step}: " + "; ".join(f"{c['key']} {_shown(c['old'])} -> {_shown(c['new'])}"
                                                      for c in now)] if now else []
    if unused:
        notes.append(f"resume_accept_changes: {', '.join(unused)} did not change")
    return "\n".join(notes)


def group_settings(optimizer: Any) -> list[dict[str, Any]]:
    """The hyperparameters a freshly built optimizer's groups hold (``GROUP_KEYS`` and ``lr``)."""
    return [{key: group[key] for key in (*GROUP_KEYS, "lr") if key in group} for group in optimizer.param_groups]


def apply_accepted_changes(optimizer: Any, scheduler: Any, fresh: list[dict[str, Any]], changes: list[dict]) -> None:
    """Put this run's settings back over the checkpoint's, once the Trainer has loaded the checkpoint's optimizer
    and scheduler state (torch restores every group hyperparameter, the scheduler its base learning rates).

    ``fresh``: ``group_settings`` of the optimizer as this run built it. Settings that did not change are equal
    either way; the learning rate keeps the schedule's factor at the resumed step (lr = base * factor), with
    this run's base.

    Under DeepSpeed, ``optimizer`` is ZeRO's base optimizer: its groups are the ones that step and that the
    Trainer's scheduler writes through the wrappers, and ``deepspeed_load_checkpoint`` has loaded the
    checkpoint's into them before this runs (tests/train/test_resume_recipe_distributed.py)."""
    if not changes:
        return
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update({key: value for key, value in settings.items() if key != "lr"})
    if scheduler is None or not hasattr(scheduler, "base_lrs"):
        return
    bases = []
    for group, settings, old_base in zip(optimizer.param_groups, fresh, scheduler.base_lrs):
        factor = group["lr"] / old_base if old_base else 1.0
        group["lr"] = settings["lr"] * factor if old_base else group["lr"]
        group["initial_lr"] = settings["lr"]
        bases.append(settings["lr"])
    scheduler.base_lrs = bases
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def checkpoint_step(checkpoint: str | Path | None) -> int:
    """The optimizer step a checkpoint was saved at (its trainer state's ``global_step``), 0 without one."""
    if checkpoint is None:
        return 0
    try:
        return int(json.loads(Path(checkpoint, "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def data_fingerprint(name: str) -> str:
    """A local data file or folder by its content (sha256 over its files, in path order); anything else (a hub
    dataset) by its name."""
    path = Path(name)
    if not path.exists():
        return name
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(item for item in path.rglob("*") if item.is_file())
    for item in files:
        digest.update(str(item.relative_to(path.parent if path.is_file() else path)).encode())
        with item.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return f"{path.name} (sha256 {digest.hexdigest()[:16]})"

"""Checks a run makes before it loads anything (the dry run makes them too), each refusal one line.

- ``output_dir``: not a file, writable, not in use by another run (``run_dir``), and not holding a finished
  run or checkpoints unless ``overwrite_output_dir`` says to replace it or the run resumes from it;
- ``resume_from_checkpoint``: ``latest`` / ``true`` become the newest complete checkpoint of ``output_dir``;
  a path must be a complete checkpoint, with its optimizer state unless ``resume_weights_only``.

``check_settings`` refuses what the Trainer would otherwise take and then ignore or fail on late: reporters
that are unknown or not installed, a run of zero steps, fp16 where it cannot apply.

(Hyperparameters that are not finite are refused earlier, by ``DualAdamTrainingArguments``.)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from dualadam_hf.hf.checkpoints import (FINISHED_RUN_FILES, MANIFEST, checkpoints_in, latest_complete, missing_parts,
                                        skipped_note, verify)
from dualadam_hf.train.run_dir import ASIDE, entries, holder, in_use_message

LATEST = ("latest", "true")


def _resolve_resume(args: Any) -> str:
    """Settle ``args.resume_from_checkpoint`` to the path of a complete checkpoint whose files match its manifest,
    or None; returns a note. Reads every file of the checkpoint once (seconds for 14 GB: docs/reliability.md)."""
    value = args.resume_from_checkpoint
    if value is None or str(value).strip().lower() in ("", "false", "none"):
        args.resume_from_checkpoint = None
        return ""
    if str(value).strip().lower() in LATEST:
        checkpoint, skipped = latest_complete(args.output_dir)
        if checkpoint is None:
            raise ValueError(f"resume_from_checkpoint {value}: no complete checkpoint in {args.output_dir}"
                             + (f" ({skipped_note(skipped)})" if skipped else ""))
        note = f"resuming from {checkpoint} (the newest complete checkpoint"
        note += f"; {skipped_note(skipped)})" if skipped else ")"
    else:
        checkpoint = Path(value)
        if not checkpoint.is_dir():
            raise ValueError(f"resume_from_checkpoint {value}: no such folder")
        missing = missing_parts(checkpoint, optimizer=not args.resume_weights_only)
        if missing:
            hint = ("; set resume_weights_only: true to resume its weights with a fresh optimizer"
                    if missing == ["optimizer state (optimizer.pt)"] else "")
            raise ValueError(f"resume_from_checkpoint {value}: not a complete checkpoint, no {' and no '.join(missing)}{hint}")
        problems = verify(checkpoint, optimizer=not args.resume_weights_only)
        if problems:
            raise ValueError(f"resume_from_checkpoint {value}: its files changed after the save, {'; '.join(problems)} "
                             f"({MANIFEST}); resume from an earlier checkpoint")
        note = (f"resuming the weights of {checkpoint} with a fresh optimizer: alpha and the learning-rate schedule "
                "restart" if args.resume_weights_only else f"resuming from {checkpoint}")
    args.resume_from_checkpoint = str(checkpoint)
    if not (checkpoint / MANIFEST).is_file():
        note += (f"\n{checkpoint.name} has no {MANIFEST} (saved by plain transformers or an older dualadam_hf): its "
                 "parts were checked, not its bytes")
    return note


def _check_writable(output_dir: Path) -> None:
    """Create and remove a scratch folder where output_dir would be made: the only test that holds for root and
    for read-only file systems alike."""
    existing = next((candidate for candidate in (output_dir, *output_dir.parents) if candidate.exists()), Path.cwd())
    if not existing.is_dir():
        raise ValueError(f"output_dir {output_dir}: {existing} is a file, not a folder")
    try:
        scratch = tempfile.mkdtemp(prefix=".dualadam-write-test-", dir=existing)
    except OSError as error:
        raise ValueError(f"output_dir {output_dir}: not writable ({existing}: {error.strerror})") from None
    os.rmdir(scratch)


def _previous_run(output_dir: Path) -> list[str]:
    if not output_dir.is_dir():
        return []
    # a run set aside by an overwrite that was killed before its first save is still a run (run_dir)
    aside = (output_dir / ASIDE).is_dir()
    aside = [f"{ASIDE} (a run set aside by an overwrite that stopped before saving)"] if aside else []
    return aside + [name for name in FINISHED_RUN_FILES if (output_dir / name).exists()] + [
        path.name for path in reversed(checkpoints_in(output_dir))
    ]


def _resumes_into(args: Any, output_dir: Path) -> bool:
    """Whether the (settled) checkpoint to resume from is one of output_dir's own."""
    checkpoint = args.resume_from_checkpoint
    return checkpoint is not None and Path(checkpoint).resolve().parent == output_dir.resolve()


def sets_aside_previous_run(args: Any) -> bool:
    """Whether this run moves what output_dir holds aside when it starts (``run_dir``): it overwrites, and does
    not resume from one of output_dir's own checkpoints."""
    return bool(args.overwrite_output_dir) and not _resumes_into(args, Path(args.output_dir))


def _check_overwrite_target(output_dir: Path) -> None:
    """An overwrite moves aside, then removes, every entry of output_dir: never the folder the user works in."""
    target, here = output_dir.resolve(), Path.cwd().resolve()
    if target in (here, *here.parents, Path.home().resolve()):
        raise ValueError(f"output_dir {output_dir}: overwrite_output_dir would remove everything in {target}, which "
                         "holds the current or home directory; give the run a folder of its own")


def check_run_directories(args: Any) -> str:
    """Refuse what would lose or mix runs; settle the checkpoint to resume from. Leaves nothing behind (the
    writability test's scratch folder is removed at once)."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {output_dir}: exists and is a file")
    _check_writable(output_dir)
    # the main process only: under accelerate launch the others belong to the run that takes the lock
    who = holder(output_dir) if args.process_index == 0 else None
    if who is not None:
        raise ValueError(in_use_message(output_dir, who))
    note = _resolve_resume(args)
    resuming_here = _resumes_into(args, output_dir)
    previous = _previous_run(output_dir)
    if previous and not args.overwrite_output_dir and not resuming_here:
        shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
        raise ValueError(
            f"output_dir {output_dir} already holds a run ({shown}); set overwrite_output_dir: true to replace it, "
            "or resume_from_checkpoint: latest to continue it"
        )
    if sets_aside_previous_run(args) and output_dir.is_dir() and (previous or entries(output_dir)):
        _check_overwrite_target(output_dir)
        note = "\n".join(filter(None, [note, (
            f"overwrite_output_dir: what {output_dir} holds is moved aside into {ASIDE} when the run starts, put back "
            "if the run stops before its first save, removed once it has saved")]))
    return note



# Reporters whose availability check in transformers.integrations is not named is_<name>_available
REPORTER_CHECKS = {"azure_ml": "is_azureml_available", "comet_ml": "is_comet_available",
                   "flyte": "is_flytekit_available"}


def check_settings(args: Any, *, dry_run: bool) -> str:
    """Refuse settings the Trainer would take and then fail on after the model is loaded, or ignore; returns a
    note (a dry run on a machine without the GPU a recipe needs says what a run here would do)."""
    _check_reporters(args.report_to)
    if args.max_steps == 0:
        raise ValueError("max_steps 0 trains nothing; set max_steps to the number of optimizer steps, or -1 to train "
                         "num_train_epochs epochs")
    if args.max_steps < 0 and args.num_train_epochs <= 0:
        raise ValueError(f"num_train_epochs {args.num_train_epochs:g} trains nothing; set num_train_epochs above 0, "
                         "or max_steps to the number of optimizer steps")
    if args.fp16 and args.device.type == "cpu":
        # Accelerate turns fp16 autocast on for accelerators only: on the CPU the run would train in fp32
        if dry_run and not args.use_cpu:
            return "fp16 needs a GPU; this machine has none, and a run here is refused"
        raise ValueError("fp16 needs a GPU: on the CPU the run would train in fp32; set bf16: true (autocast on "
                         "the CPU) or fp16: false")
    return ""


def _check_reporters(report_to: list[str]) -> None:
    """Each name of ``report_to`` known to transformers and installed (a comma-joined list is split by
    DualAdamTrainingArguments)."""
    from transformers.integrations import integration_utils

    known = integration_utils.INTEGRATION_TO_CALLBACK
    for name in report_to:
        if name in ("all", "none"):  # alone they never reach here: TrainingArguments expands them
            raise ValueError(f"report_to {name!r} stands alone; it cannot be listed with other reporters")
        if name not in known:
            raise ValueError(f"report_to {name!r}: unknown; known: {', '.join(sorted(known))}, all, none")
        check = REPORTER_CHECKS.get(name, f"is_{name}_available")
        if hasattr(integration_utils, check) and not getattr(integration_utils, check)():
            raise ValueError(f"report_to {name}: not installed or not set up here (transformers' {check}() is false); "
                             "install it or remove it from report_to")

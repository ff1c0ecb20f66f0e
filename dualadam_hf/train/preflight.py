"""Checks a run makes before it loads anything (the dry run makes them too), each refusal one line.

- ``output_dir``: not a file, writable, and not holding a finished run or checkpoints unless
  ``overwrite_output_dir`` says to replace it or the run resumes from it;
- ``resume_from_checkpoint``: ``latest`` / ``true`` become the newest complete checkpoint of ``output_dir``;
  a path must be a complete checkpoint, with its optimizer state unless ``resume_weights_only``.

(Hyperparameters that are not finite are refused earlier, by ``DualAdamTrainingArguments``.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dualadam_hf.hf.checkpoints import FINISHED_RUN_FILES, checkpoints_in, latest_complete, missing_parts, partial_dirs

LATEST = ("latest", "true")


def _resolve_resume(args: Any) -> str:
    """Settle ``args.resume_from_checkpoint`` to a complete checkpoint's path or None; returns a note."""
    value = args.resume_from_checkpoint
    if value is None or str(value).strip().lower() in ("", "false", "none"):
        args.resume_from_checkpoint = None
        return ""
    if str(value).strip().lower() in LATEST:
        checkpoint, skipped = latest_complete(args.output_dir)
        if checkpoint is None:
            raise ValueError(f"resume_from_checkpoint {value}: no complete checkpoint in {args.output_dir}")
        args.resume_from_checkpoint = str(checkpoint)
        note = f"resuming from {checkpoint} (the newest complete checkpoint"
        return note + (f"; skipped incomplete {', '.join(p.name for p in skipped)})" if skipped else ")")
    checkpoint = Path(value)
    if not checkpoint.is_dir():
        raise ValueError(f"resume_from_checkpoint {value}: no such folder")
    missing = missing_parts(checkpoint, optimizer=not args.resume_weights_only)
    if missing:
        hint = ("; set resume_weights_only: true to resume its weights with a fresh optimizer"
                if missing == ["optimizer state (optimizer.pt)"] else "")
        raise ValueError(f"resume_from_checkpoint {value}: not a complete checkpoint, no {' and no '.join(missing)}{hint}")
    if args.resume_weights_only:
        return f"resuming the weights of {checkpoint} with a fresh optimizer: alpha and the learning-rate schedule restart"
    return f"resuming from {checkpoint}"


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
    return [name for name in FINISHED_RUN_FILES if (output_dir / name).exists()] + [
        path.name for path in reversed(checkpoints_in(output_dir))
    ]


def _resumes_into(args: Any, output_dir: Path) -> bool:
    """Whether the (settled) checkpoint to resume from is one of output_dir's own."""
    checkpoint = args.resume_from_checkpoint
    return checkpoint is not None and Path(checkpoint).resolve().parent == output_dir.resolve()


def check_run_directories(args: Any) -> str:
    """Refuse what would lose or mix runs; settle the checkpoint to resume from. Leaves nothing behind (the
    writability test's scratch folder is removed at once)."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {output_dir}: exists and is a file")
    _check_writable(output_dir)
    note = _resolve_resume(args)
    resuming_here = _resumes_into(args, output_dir)
    previous = _previous_run(output_dir)
    if previous and not args.overwrite_output_dir and not resuming_here:
        shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
        raise ValueError(
            f"output_dir {output_dir} already holds a run ({shown}); set overwrite_output_dir: true to replace it, "
            "or resume_from_checkpoint: latest to continue it"
        )
    if previous and args.overwrite_output_dir and not resuming_here:
        note = "\n".join(filter(None, [note, f"overwrite_output_dir: the run in {output_dir} is removed first"]))
    return note


def clear_previous_run(args: Any) -> None:
    """With overwrite_output_dir, remove the earlier run's checkpoints and result files, so that the newest
    checkpoint and every result file in output_dir are this run's."""
    output_dir = Path(args.output_dir)
    if not args.overwrite_output_dir or not output_dir.is_dir():
        return
    if _resumes_into(args, output_dir):
        return
    for path in [*checkpoints_in(output_dir), *partial_dirs(output_dir)]:
        shutil.rmtree(path)
    for name in FINISHED_RUN_FILES:
        if (output_dir / name).is_file():
            (output_dir / name).unlink()

"""Checkpoints that are complete or absent, and how to tell which.

A checkpoint is written under a hidden staging name (``.partial-checkpoint-N/checkpoint-N``) and moved to
``checkpoint-N`` by one rename once every process has written its part, so a crash mid-save leaves no
folder that transformers' ``get_last_checkpoint`` (or ``latest`` here) would take for a checkpoint.
Folders written by a run that crashed before this existed (``checkpoint-N`` without its trainer state,
with a 0-byte or truncated file) are recognised by ``missing_parts`` and skipped.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_PREFIX = ".partial-"
TRAINER_STATE = "trainer_state.json"
# Each engine's model weights and optimizer state, as the Trainer lays them out in a checkpoint.
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin",
           "pytorch_model_fsdp_0", "pytorch_model_fsdp.bin")
OPTIMIZER_STATES = ("optimizer.pt", "optimizer_0", "optimizer.bin")
FINISHED_RUN_FILES = ("trainer_state.json", "model.safetensors", "adapter_model.safetensors", "run_config.json",
                      "all_results.json")


def staging_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"{PARTIAL_PREFIX}checkpoint-{step}"


def _deepspeed_tag(checkpoint: Path) -> Path | None:
    latest = checkpoint / "latest"
    if not latest.is_file():
        return None
    tag = checkpoint / latest.read_text().strip()
    return tag if tag.is_dir() else None


def missing_parts(checkpoint: Path, *, optimizer: bool = True) -> list[str]:
    """What a checkpoint folder lacks to resume from ([] when nothing): its trainer state (present and
    readable JSON), its model weights (non-empty) and, when ``optimizer``, the optimizer state."""
    missing = []
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        missing.append(f"a readable {TRAINER_STATE}")
    deepspeed = _deepspeed_tag(checkpoint)
    weights = [checkpoint / name for name in WEIGHTS if (checkpoint / name).exists()]
    if not deepspeed and not any(path.is_dir() or path.stat().st_size > 0 for path in weights):
        missing.append("model weights")
    if optimizer and not deepspeed and not any((checkpoint / name).exists() for name in OPTIMIZER_STATES):
        missing.append("optimizer state (optimizer.pt)")
    return missing


def checkpoints_in(run_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of a run directory, newest (highest N) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [path for path in run_dir.iterdir() if path.is_dir() and CHECKPOINT.match(path.name)]
    return sorted(found, key=lambda path: int(CHECKPOINT.match(path.name).group(1)), reverse=True)


def latest_complete(run_dir: str | Path) -> tuple[Path | None, list[Path]]:
    """The newest checkpoint that has everything to resume from, and the newer incomplete ones it skipped."""
    skipped = []
    for checkpoint in checkpoints_in(run_dir):
        if not missing_parts(checkpoint):
            return checkpoint, skipped
        skipped.append(checkpoint)
    return None, skipped


def partial_dirs(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    return sorted(run_dir.glob(f"{PARTIAL_PREFIX}checkpoint-*")) if run_dir.is_dir() else []


def publish(run_dir: str | Path, step: int) -> Path:
    """Move a fully written staged checkpoint into place (one rename) and drop its staging folder."""
    staging = staging_dir(run_dir, step)
    final = Path(run_dir) / f"checkpoint-{step}"
    if final.exists():  # the same step saved again (a resumed run re-saving its own step)
        shutil.rmtree(final)
    (staging / final.name).rename(final)
    shutil.rmtree(staging)
    return final

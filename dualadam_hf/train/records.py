"""The run record: what a finished run of our training apps was, written beside ``trainer_state.json``.

One writer (``write_run_record``, called by the apps once the run is saved) and one reader
(``read_run_record``, used by the analysis tools). ``kind`` says which app wrote it, so a reader never
guesses from the other keys; ``details`` holds what that app needs to rebuild the run's model and data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RUN_RECORD = "run_config.json"
KINDS = ("causal_lm", "vision")
_COMMON = ("kind", "optim", "optim_args", "learning_rate", "weight_decay", "seed")


class RunRecordError(ValueError):
    """A run record that is missing or unreadable; the message names the file."""


@dataclass(frozen=True)
class RunRecord:
    kind: str
    optim: str
    optim_args: str | None
    learning_rate: float
    weight_decay: float
    seed: int
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    def detail(self, key: str, default: Any = ...) -> Any:
        """One of the app's details; a missing one without a default is an error naming the key."""
        if key in self.details:
            return self.details[key]
        if default is not ...:
            return default
        raise RunRecordError(f"{RUN_RECORD}: no {key!r}")


def write_run_record(training_args: Any, kind: str, **details: Any) -> RunRecord:
    """Write ``output_dir/run_config.json`` (one flat JSON object) and return what was written."""
    record = RunRecord(
        kind=kind,
        optim=str(training_args.optim.value),
        optim_args=training_args.optim_args,
        learning_rate=training_args.learning_rate,
        weight_decay=training_args.weight_decay,
        seed=training_args.seed,
        details=details,
    )
    flat = {key: value for key, value in asdict(record).items() if key != "details"} | record.details
    Path(training_args.output_dir, RUN_RECORD).write_text(json.dumps(flat, indent=2) + "\n")
    return record


def read_run_record(run_dir: Path) -> RunRecord:
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        raise RunRecordError(f"{run_dir}: no {RUN_RECORD} (not a finished run of our scripts?)")
    try:
        flat = json.loads(path.read_text())
    except json.JSONDecodeError:
        flat = None
    if not isinstance(flat, dict):
        raise RunRecordError(f"{path}: not a JSON object")
    missing = [key for key in _COMMON if key not in flat]
    if missing:
        raise RunRecordError(f"{path}: no {missing[0]!r} (written by an older dualadam_hf? rerun it)")
    try:
        return RunRecord(**{key: flat[key] for key in _COMMON},
                         details={key: value for key, value in flat.items() if key not in _COMMON})
    except ValueError as error:
        raise RunRecordError(f"{path}: {error}") from None

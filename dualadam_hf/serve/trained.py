"""A fine-tuned model loaded back from what its run left: full weights, or the base model with the LoRA adapter.

``load_trained`` takes a run's output_dir, one of its ``checkpoint-N`` folders, any model folder, a Hub id or
``builtin:tiny-llama``. A run's ``run_config.json`` (in the folder, or beside a checkpoint in the run's folder)
names the base model an adapter was trained on and the seed the built-in tiny Llama is rebuilt with; a folder
without one is loaded as a plain model (an adapter then needs ``base_model_name_or_path`` in its config).
Nothing here runs a checkpoint's own Python files. Every way this can fail is one ``ServeError`` (or
``ModelLoadError``) line that names the folder or the model.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualadam_hf.hf.checkpoints import MANIFEST, CHECKPOINT, PARTIAL_PREFIX, checkpoints_in, missing_parts, verify
from dualadam_hf.models.loading import TOKENIZER_FILES, ModelLoadError, first_line
from dualadam_hf.models.tiny import is_builtin
from dualadam_hf.train.records import RUN_RECORD, RunRecord, read_run_record

ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_SEED = 42
"""TrainingArguments' default seed: what builds ``builtin:tiny-llama`` when no run recorded another."""


class ServeError(ValueError):
    """What was given cannot be loaded as a model; the one-line message names it and why."""


@dataclass(frozen=True)
class TrainedModel:
    model: Any  # a transformers model, or a peft PeftModel (base + adapter) when ``base`` is set
    tokenizer: Any
    source: str  # as given
    folder: Path | None  # the folder the weights came from (None for a Hub id or the built-in model)
    record: RunRecord | None  # the run's record, when a run of scripts/finetune.py left the folder
    base: str | None  # the base model under a LoRA adapter

    @property
    def trained_here(self) -> bool:
        """Whether the training examples were rendered by ``dualadam_hf.train.sft_data`` (a run of finetune.py,
        or a checkpoint the HF Trainer wrote for one): then a tokenizer without a chat template means the Alpaca
        prompt."""
        return self.record is not None or (self.folder is not None and (self.folder / "trainer_state.json").is_file())

    def summary(self) -> str:
        """What was loaded, in a few words: ``full fine-tune of BASE`` / ``LoRA adapter on BASE`` / the model."""
        optimizer = f", {self.record.optim}" if self.record is not None else ""
        if self.base is not None:
            return f"LoRA adapter on {self.base}{optimizer}"
        if self.record is not None:
            return f"full fine-tune of {self.record.detail('model', '?')}{optimizer}"
        return "model"


def load_trained(source: str, *, dtype: str = "auto") -> TrainedModel:
    """Load ``source`` on the CPU, in eval mode, with weights in ``dtype`` (``auto``: as stored (an adapter: as its
    base's), or bfloat16, float16, float32)."""
    folder = Path(source).expanduser()
    if not folder.exists():
        if not _is_model_id(source):
            raise ServeError(f"{source}: no such directory")
        model, tokenizer = _load_full(source, dtype, DEFAULT_SEED)
        return TrainedModel(model, tokenizer, source, None, None, None)
    if not folder.is_dir():
        raise ServeError(f"{source}: not a directory (give a run's output_dir, a checkpoint folder or a model folder)")
    damage = verify(folder, optimizer=False)  # [] for a folder without a manifest (not a checkpoint of ours)
    if damage:
        raise ServeError(f"{folder}: its files differ from its {MANIFEST} ({'; '.join(damage)})")
    record = _record_for(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        return _load_adapter(source, folder, record, dtype)
    if not (folder / "config.json").is_file():
        raise ServeError(_why_no_model(folder))
    seed = record.seed if record is not None else DEFAULT_SEED
    model, tokenizer = _load_full(str(folder), dtype, seed)
    return TrainedModel(model, tokenizer, source, folder, record, None)


def _is_model_id(name: str) -> bool:
    """A Hub id (``name`` or ``org/name``) or the built-in model, rather than a path: as ``sft_data`` tells a
    dataset id from a local path, and ``org/name`` whose ``org`` is a folder here (``outputs/run``) is a path."""
    if is_builtin(name):
        return True
    parent = Path(name).parent
    return name.count("/") <= 1 and not name.startswith(("/", ".", "~")) and not (parent != Path(".") and parent.is_dir())


def _record_for(folder: Path) -> RunRecord | None:
    """The run record in ``folder``, or beside it for a checkpoint folder; a vision run's is refused."""
    for candidate in (folder, folder.parent if CHECKPOINT.match(folder.name) else None):
        if candidate is not None and (candidate / RUN_RECORD).is_file():
            record = read_run_record(candidate)  # RunRecordError: a one-line ValueError naming the file
            if record.kind != "causal_lm":
                raise ServeError(f"{folder}: a {record.kind} run ({candidate / RUN_RECORD}); only causal LMs chat and export")
            return record
    return None


def _why_no_model(folder: Path) -> str:
    """The one line for a folder with neither full weights nor an adapter: an unfinished run, or no model at all."""
    checkpoints = checkpoints_in(folder)
    usable = [checkpoint for checkpoint in checkpoints
              if not missing_parts(checkpoint, optimizer=False) and not verify(checkpoint, optimizer=False)]
    if usable:
        return (f"{folder}: an unfinished run (no final model and no {RUN_RECORD} yet); its newest checkpoint "
                f"is {usable[0]}: pass that folder")
    if checkpoints or (folder / "trainer_state.json").is_file() or any(folder.glob(f"{PARTIAL_PREFIX}*")):
        return f"{folder}: an unfinished run with no model saved yet (no final model and no complete checkpoint)"
    return (f"{folder}: no model here (no config.json for full weights, no {ADAPTER_CONFIG} for a LoRA adapter); "
            "give a run's output_dir, a checkpoint folder or a model folder")


def _load_full(name: str, dtype: str, seed: int) -> tuple[Any, Any]:
    """Through the training app's own loader: the same checks, the same one-line errors, no remote code."""
    from dualadam_hf.train.finetune import ModelArguments, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelArguments(model_name_or_path=name, dtype=dtype), seed=seed)
    model.eval()
    return model, tokenizer


def _load_adapter(source: str, folder: Path, record: RunRecord | None, dtype: str) -> TrainedModel:
    try:
        adapter_config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except ValueError as error:
        raise ServeError(f"{folder / ADAPTER_CONFIG}: not JSON ({first_line(error)})") from None
    base = record.detail("model", None) if record is not None else None
    base = base or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ServeError(f"{folder}: a LoRA adapter whose base model is not recorded (no {RUN_RECORD} beside it, "
                         f"and {ADAPTER_CONFIG} names none)")
    if is_builtin(base) and record is None:
        raise ServeError(f"{folder}: the adapter's base {base} is rebuilt from the run's seed, which its "
                         f"{RUN_RECORD} holds, and there is none (the run has not finished)")
    try:
        base_model, base_tokenizer = _load_full(base, dtype, record.seed if record is not None else DEFAULT_SEED)
    except ModelLoadError as error:
        raise ServeError(f"{folder}: the adapter's base model {base} is not available: {error}") from None
    tokenizer = _load_tokenizer(folder) if any((folder / name).is_file() for name in TOKENIZER_FILES) else base_tokenizer
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base_model, folder)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ServeError(f"{folder}: the LoRA adapter does not fit its base {base}: {first_line(error)}") from None
    model.eval()
    return TrainedModel(model, tokenizer, source, folder, record, base)


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, ImportError, KeyError) as error:
        raise ModelLoadError(f"cannot load the tokenizer of {str(folder)!r}: {first_line(error)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quiet_libraries() -> None:
    """Keep what a user of chat and export reads to their own output: no progress bars from transformers, and
    none of its deprecation notes meant for library authors (peft calls ``is_gradient_checkpointing``, deprecated
    in transformers 5)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

"""Instruction-tuning data in the Alpaca schema: load, check, tokenize, collate.

A record has a string ``instruction``, an optional string ``input`` and a string ``output``.
The model learns the response only: every prompt token is labelled ``IGNORE_INDEX``, so the
loss (and the perplexity derived from it) is measured on response tokens and the final eos.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError
from datasets.utils import logging as datasets_logging

from dualadam_hf.train.cli import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a token that takes no part in the loss (the value torch's cross-entropy ignores)."""

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

_BUILDER_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# What datasets reads as a split's data in a dataset folder
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".arrow")
_REQUIRED_FIELDS = ("instruction", "output")


@dataclass
class DataArguments:
    """Where the instruction data comes from and how it is split and cut."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id, or a local .json/.jsonl/.parquet file, in the Alpaca schema "
            "(instruction, input, output). Required."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str | None = field(
        default=None,
        metadata={"help": "Split to evaluate on. None holds out validation_fraction of the training split."},
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of the training split held out for evaluation when validation_split is None."},
    )
    split_seed: int = field(default=42, metadata={"help": "Seed of the held-out split."})
    max_seq_length: int = field(
        default=512, metadata={"help": "Examples are cut to this many tokens, prompt and response together."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (after the split)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N evaluation examples (after the split)."}
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Padding-free batches: each batch's examples in one row, kept apart by attention, for "
            "training and evaluation. The same examples per step and the same loss, without computing padding."
        },
    )

    def __post_init__(self):
        if self.dataset_name is None:
            raise ValueError("dataset_name is required: a Hub dataset id or a .json/.jsonl/.parquet file")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.validation_split == self.train_split:
            raise ValueError(f"validation_split must differ from train_split, both are {self.train_split!r}")
        # Below 8 tokens even the prompt's first words do not fit; such a value is a typo.
        if self.max_seq_length < 8:
            raise ValueError(f"max_seq_length must be at least 8, got {self.max_seq_length}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 or None, got {value}")
        _check_local_dataset(self.dataset_name)


def _check_local_dataset(name: str) -> None:
    """Refuse, before anything loads, a dataset_name that is plainly a local path but names nothing usable.

    A hub id is ``org/name``; a name that starts like a path (``/``, ``./``, ``../``, ``~``), has more than one
    ``/``, or ends in a data file's suffix is a local path.
    """
    if name.startswith("builtin:"):
        return
    path = Path(name).expanduser()
    local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or path.suffix.lower() in _BUILDER_BY_SUFFIX
    if local and not path.exists():
        raise ValueError(f"dataset_name {name}: no such file or folder")
    if path.is_dir() and not any(path.iterdir()):
        raise ValueError(f"dataset_name {name}: an empty folder")


def format_alpaca_prompt(instruction: str, input_text: str) -> str:
    """Return the Alpaca prompt, which ends where the response begins.

    With a non-empty ``input_text`` the prompt is ``ALPACA_PROMPT_WITH_INPUT``::

        Below is an instruction that describes a task, paired with an input that provides further
        context. Write a response that appropriately completes the request.

        ### Instruction:
        {instruction}

        ### Input:
        {input}

        ### Response:

    (the first paragraph is one line). Without input it is ``ALPACA_PROMPT_NO_INPUT``: the first
    sentence ends at "task." and the ``### Input:`` block is absent. Both end with a newline
    after ``### Response:``.
    """
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def alpaca_texts(path: Path) -> list[str]:
    """Each record of an Alpaca JSONL file as the pipeline shows it without a chat template: prompt, then response."""
    with path.open(encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    return [format_alpaca_prompt(r["instruction"], r.get("input") or "") + r["output"] for r in records]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def user_turn(instruction: str, input_text: str) -> str:
    """The user's message under a chat template: the instruction, then a blank line and the input if any."""
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def build_prompt(tokenizer, instruction: str, input_text: str) -> str:
    """Return the text that precedes the response: the tokenizer's chat template if it has one, else Alpaca's.

    Under a chat template it is the rendered user turn followed by the assistant's opening
    (``add_generation_prompt``), exactly what the model sees at inference.
    """
    if not has_chat_template(tokenizer):
        return format_alpaca_prompt(instruction, input_text)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_turn(instruction, input_text)}], tokenize=False, add_generation_prompt=True
    )


def encode_prompt(tokenizer, instruction: str, input_text: str) -> list[int]:
    """The ids the model reads before the response, as a training example holds them (and as the model is asked
    at inference): the rendered chat template tokenized with the tokenizer's defaults (a bos it adds included),
    or bos (when the tokenizer has one) and the Alpaca prompt."""
    prompt = build_prompt(tokenizer, instruction, input_text)
    if has_chat_template(tokenizer):
        return tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids if tokenizer.bos_token_id is None else [tokenizer.bos_token_id, *ids]


def _read_local_file(path: Path, builder: str) -> DatasetDict:
    verbosity = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)  # it logs a parse error, then raises it: said once, below
    try:
        return load_dataset(builder, data_files=str(path))
    except (DatasetGenerationError, ValueError, StopIteration) as error:
        # datasets fails in one of these ways on a file with no records and on malformed content.
        detail = str(error.__cause__ or error) or type(error).__name__
        raise DataError(f"{path}: no records could be read as {builder} ({detail})") from error
    finally:
        datasets_logging.set_verbosity(verbosity)


def _load_splits(dataset_name: str) -> DatasetDict:
    path = Path(dataset_name)
    builder = _BUILDER_BY_SUFFIX.get(path.suffix.lower())
    if path.is_file():
        if builder is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .json, .jsonl or .parquet")
        return _read_local_file(path, builder)
    if builder is not None:
        raise DataError(f"dataset file not found: {path}")
    if path.is_dir():
        _refuse_empty_files(path)
    return load_dataset(dataset_name)  # a Hub dataset id, or a local dataset folder


def _refuse_empty_files(folder: Path) -> None:
    """A split file with no records in a dataset folder: datasets would fail on it with a bare ValueError
    ("Instruction 'validation' corresponds to no data!") that names neither the split nor the file."""
    for path in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)  # datasets skips these too
        if path.suffix.lower() in _DATA_SUFFIXES and path.is_file() and not hidden and _is_blank(path):
            raise DataError(f"{path}: an empty file (no records) in the dataset folder {folder}")


def _is_blank(path: Path) -> bool:
    with path.open("rb") as data:
        return not any(chunk.strip() for chunk in iter(lambda: data.read(1 << 16), b""))


def _select_split(splits: DatasetDict, split: str, dataset_name: str) -> tuple[Dataset, str]:
    """Return the split and the name that error messages give it."""
    if split not in splits:
        available = ", ".join(splits) or "none"
        raise DataError(f"{dataset_name}: no split {split!r}; available: {available}")
    source = dataset_name if len(splits) == 1 else f"{dataset_name} (split {split!r})"
    return splits[split], source


def _check_records(dataset: Dataset, source: str) -> None:
    """Refuse the first record that breaks the Alpaca schema; indices count from 0, as in ``dataset[i]``."""
    if len(dataset) == 0:
        raise DataError(f"{source}: no records")
    for name in _REQUIRED_FIELDS:
        if name not in dataset.column_names:
            raise DataError(f"{source}: record 0 has no field {name!r}")
    present = [name for name in ("instruction", "input", "output") if name in dataset.column_names]
    for index, values in enumerate(zip(*(dataset[name] for name in present))):
        for name, value in zip(present, values):
            # A key missing from one JSON record loads as null, so the two cannot be told apart.
            if value is None and name in _REQUIRED_FIELDS:
                raise DataError(f"{source}: record {index} has no field {name!r} (missing or null)")
            if value is not None and not isinstance(value, str):
                raise DataError(f"{source}: record {index} field {name!r} is {type(value).__name__}, not text")


def _first(dataset: Dataset, count: int | None) -> Dataset:
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def load_records(data_args: DataArguments) -> tuple[Dataset, Dataset]:
    """Load, check and split the records; return ``(train, eval)`` with their original columns.

    Records are checked before any split so that an error's record index refers to the source.
    Without ``validation_split``, ``validation_fraction`` of the training split (rounded up) is held
    out with ``split_seed``.
    """
    splits = _load_splits(data_args.dataset_name)
    train, train_source = _select_split(splits, data_args.train_split, data_args.dataset_name)
    _check_records(train, train_source)
    if data_args.validation_split is None:
        try:
            held_out = train.train_test_split(test_size=data_args.validation_fraction, seed=data_args.split_seed)
        except ValueError as error:  # too few records to leave both parts non-empty
            raise DataError(
                f"{train_source}: cannot hold out validation_fraction={data_args.validation_fraction} "
                f"of {len(train)} records ({error})"
            ) from error
        train, evaluation = held_out["train"], held_out["test"]
    else:
        evaluation, eval_source = _select_split(splits, data_args.validation_split, data_args.dataset_name)
        _check_records(evaluation, eval_source)
    return _first(train, data_args.max_train_samples), _first(evaluation, data_args.max_eval_samples)


def _chat_example(tokenizer, record: dict) -> tuple[list[int], int]:
    """The whole rendered conversation's ids, and how many of them belong to the prompt.

    The conversation is tokenized once, with the tokenizer's defaults, as the model card's inference
    code tokenizes a rendered prompt (so a bos the tokenizer adds is there too). Tokenizing the prompt
    and the response apart would differ from it: a sentencepiece tokenizer gives the response's first
    piece a dummy-prefix ``▁`` that the whole conversation does not have. The prompt's length is the
    longest run of ids the conversation shares with the prompt tokenized alone, so a piece that joins
    the prompt's last characters to the response's first is learnt, not masked.
    """
    prompt = build_prompt(tokenizer, record["instruction"], record.get("input") or "")
    conversation = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": user_turn(record["instruction"], record.get("input") or "")},
            {"role": "assistant", "content": record["output"]},
        ],
        tokenize=False,
    )
    if not conversation.startswith(prompt):
        raise DataError(
            "the tokenizer's chat template renders the prompt differently inside the conversation; "
            "labels cannot be placed (use a template whose generation prompt starts the assistant turn)"
        )
    input_ids = tokenizer(conversation)["input_ids"]
    prompt_ids = encode_prompt(tokenizer, record["instruction"], record.get("input") or "")
    shared = next(
        (index for index, (a, b) in enumerate(zip(input_ids, prompt_ids)) if a != b), min(len(input_ids), len(prompt_ids))
    )
    return input_ids, shared


def _alpaca_example(tokenizer, record: dict) -> tuple[list[int], int]:
    """[bos] + Alpaca prompt + response + eos, prompt and response tokenized apart (no dummy prefix here:
    the tokenizers without a chat template that this path serves are byte-level ones)."""
    prompt_ids = encode_prompt(tokenizer, record["instruction"], record.get("input") or "")
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    return [*prompt_ids, *response_ids, tokenizer.eos_token_id], len(prompt_ids)


def tokenize_record(tokenizer, record: dict, max_seq_length: int) -> dict:
    """Tokenize one record into ``input_ids``, ``labels``, ``attention_mask`` and ``truncated``.

    With a chat template the example is the conversation user turn -> assistant turn as the template
    renders it, tokenized whole with the tokenizer's defaults; the labels are ``IGNORE_INDEX`` through
    the end of the rendered prompt (the assistant's opening included) and the ids from the first
    response token through the template's closing token. Without one it is the Alpaca prompt with bos
    (when the tokenizer has one), then the response and eos.

    An example longer than ``max_seq_length`` is cut from the right. A prompt that alone would fill
    the budget keeps only ``max_seq_length - 1`` tokens, so that at least one response token is
    learnt: an example with every label ignored would add nothing and makes a batch of such
    examples yield a NaN loss.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token; the response must end with one")
    make = _chat_example if has_chat_template(tokenizer) else _alpaca_example
    input_ids, prompt_length = make(tokenizer, record)

    kept_prompt_length = min(prompt_length, max_seq_length - 1)
    kept_response_ids = input_ids[prompt_length:][: max_seq_length - kept_prompt_length]
    kept_ids = input_ids[:kept_prompt_length] + kept_response_ids
    return {
        "input_ids": kept_ids,
        "labels": [IGNORE_INDEX] * kept_prompt_length + kept_response_ids,
        "attention_mask": [1] * len(kept_ids),
        "truncated": len(input_ids) > max_seq_length,
    }


@dataclass(frozen=True)
class PreparedData:
    """Tokenized training and evaluation sets, with columns ``input_ids``, ``labels``, ``attention_mask``."""

    train: Dataset
    eval: Dataset
    num_truncated_train: int
    num_truncated_eval: int

    def summary(self) -> str:
        return (
            f"train: {len(self.train)} examples ({self.num_truncated_train} truncated), "
            f"eval: {len(self.eval)} examples ({self.num_truncated_eval} truncated)"
        )


def _tokenize(records: Dataset, tokenizer, max_seq_length: int, name: str) -> tuple[Dataset, int]:
    """Return the tokenized dataset without its text columns, and how many of its examples were cut."""
    tokenized = records.map(
        lambda record: tokenize_record(tokenizer, record, max_seq_length),
        remove_columns=records.column_names,
        desc=f"Tokenizing {name}",
    )
    return tokenized.remove_columns("truncated"), sum(tokenized["truncated"])


def prepare_datasets(data_args: DataArguments, tokenizer) -> PreparedData:
    """Load, check, split and tokenize the data that ``data_args`` names."""
    train_records, eval_records = load_records(data_args)
    _warn_empty_outputs(train_records, eval_records)
    train, num_truncated_train = _tokenize(train_records, tokenizer, data_args.max_seq_length, "train")
    evaluation, num_truncated_eval = _tokenize(eval_records, tokenizer, data_args.max_seq_length, "eval")
    return PreparedData(train, evaluation, num_truncated_train, num_truncated_eval)


def _warn_empty_outputs(train: Dataset, evaluation: Dataset) -> None:
    """One warning line when records have an empty output: valid, but all they teach is to end the answer."""
    counts = [sum(not text.strip() for text in records["output"]) for records in (train, evaluation)]
    if any(counts):
        logger.warning("data: %d of %d training and %d of %d evaluation records have an empty output (they teach "
                       "only the end of an answer)", counts[0], len(train), counts[1], len(evaluation))


@dataclass(frozen=True)
class SFTCollator:
    """Right-pad a batch to its longest example: input_ids with ``pad_token_id``, labels with
    ``IGNORE_INDEX``, attention_mask with 0. Returns int64 tensors; other keys are dropped."""

    pad_token_id: int

    def __post_init__(self):
        if self.pad_token_id is None:
            raise ValueError("pad_token_id is None; give the tokenizer a pad token before collating")

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(example["input_ids"]) for example in examples)

        def padded(key: str, value: int) -> torch.Tensor:
            rows = [list(example[key]) + [value] * (longest - len(example[key])) for example in examples]
            return torch.tensor(rows, dtype=torch.long)

        return {
            "input_ids": padded("input_ids", self.pad_token_id),
            "labels": padded("labels", IGNORE_INDEX),
            "attention_mask": padded("attention_mask", 0),
        }

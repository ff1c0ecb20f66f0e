"""The fine-tuning path measured phase by phase, for several optimizers side by side.

A checkpoint in openPangu-Embedded's published layout is written at a chosen shape (``tiny``: the
fixture's sizes, for a CPU; ``1b``: openPangu-Embedded-1B's published config sizes, random bf16
weights; both with the fixture's tokenizer, whose 2,000 pieces make the data's token ids: at ``1b`` the
embedding and lm_head keep the published vocabulary of 153,376 rows, so every matmul has the published
size). The data are Alpaca-schema records whose token lengths follow Alpaca-GPT4-CN's
(``packing_bench.alpaca_gpt4_like_examples``: prompt and response lengths of the shipped length asset,
mapped to the published token statistics), written in Chinese characters of the tokenizer's vocabulary.
Both go into the benchmark's workdir, and ``WRITTEN`` last, once they are whole; a later benchmark of the
same shape and record counts can take them from there read-only (``reuse``) instead of writing them again
(at ``1b``, 2.8 GB).

Each run is ``scripts/finetune.py``'s own path (``finetune.main``) with an optimizer's recipe
(``RECIPES``), ``--max_steps`` and ``--packing`` set, in a fresh Python process: imports, loading and
memory are measured as a user meets them, and one run's memory never weighs on the next. A run saves no
checkpoint while training (``--save_strategy no``): with a step strategy transformers checkpoints at
``--max_steps``, so every run of a few steps would save what the recipe's run saves once, at its end (at
``1b``, fp32 weights and Adam moments: about 17 GB); its final ``save_model`` stays. The child
process times the phases around three calls of the run (``instrumented``): loading the model, preparing
the data, and the Trainer, a ``DualAdamTrainer`` with a callback that times each optimizer step and the
``optimizer.step()`` inside it. On a GPU the callback synchronizes the device at each boundary (the
Trainer already reads the loss once per step), so the times are the device's.

Figures (``RUN_FIELDS`` lists them; a run that fails has ``status: failed``, its ``error`` line, and
None elsewhere):
- a step lasts from the end of the one before to its own end (its data loading included, evaluations and
  checkpoints between steps excluded); the first, from the start of training, is the warm-up
  (allocations, compiles); steps 2..N are the steady ones, and their figures are medians, so that one-off
  work does not decide them: the compile a low-bit DualAdam does on a CPU when alpha reaches 0 (after
  ``switch_ratio`` of the run, 30 % in the recipes: the median is an after-switch step, as 70 % of a
  recipe's steps are), a noisy neighbour; the slowest steady step is reported beside them;
- non-pad tokens/s: the median over steady steps of a step's non-pad tokens over its time; MFU:
  ``MFU_CONVENTION``; the optimizer's share: the median of optimizer.step's time over its step's;
- evaluation: the last evaluation (validation set, the training subset, and greedy generation when the
  recipe asks for it; with a step strategy transformers runs it at the last step, and ``train_and_save``
  reports it rather than evaluating again), timed whole and its generation apart; save: the final
  ``save_model``; besides them, how many evaluations the run did in all and the checkpoints it saved while
  training (none unless the flags ask for them, e.g. ``--save_strategy steps``).

The report is handed to ``on_report`` before the first run and after each one, so a benchmark stopped
midway (a timeout) leaves the runs it finished; ``planned_runs`` names them all.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoTokenizer, TrainerCallback

from dualadam_hf.analysis.bench import OPENPANGU_1B, device_name
from dualadam_hf.analysis.packing_bench import TOKENS_MEAN, TOKENS_STD, alpaca_gpt4_like_examples
from dualadam_hf.hf import trainer as hf_trainer
from dualadam_hf.hf.packing import batch_token_counts
from dualadam_hf.models import openpangu_fixture
from dualadam_hf.models.openpangu_fixture import TINY_SHAPE, weight_shapes, write_tiny_openpangu
from dualadam_hf.train import finetune, sft_data
from dualadam_hf.train.sft_data import IGNORE_INDEX, tokenize_record

SHAPES = ("tiny", "1b")
RECIPES = {
    "dualadam": "pangu_alpaca.yaml",
    "adamw_torch_fused": "pangu_alpaca_adamw.yaml",
    "dualadam_8bit": "pangu_alpaca_8bit.yaml",
    "adamw_torch_8bit": "pangu_alpaca_adamw_8bit.yaml",
}
"""optim -> its openPangu recipe: each optimizer runs with its own recipe, as a user would run it."""
PACKINGS = {"both": (True, False), "on": (True,), "off": (False,)}
MAX_SEQ_LENGTH = 1024  # the recipes'
FULL_SET_RECORDS = 48_818  # Alpaca-GPT4-CN's records (the length asset says where the figure comes from)
TRAIN_RECORDS = 1024  # 32 optimizer steps of the recipes' 32 sequences per epoch; longer runs take more epochs
EVAL_RECORDS = math.ceil(0.02 * FULL_SET_RECORDS)  # the recipes' validation_fraction of the full set: 977
DATA_FILE = "alpaca_gpt4_data_zh.json"
WRITTEN = "written.json"
"""Written into a benchmark's workdir after its checkpoint and data, so a folder without it holds a write that
was stopped: the shape and the data's figures (``write_data``'s), which a benchmark reusing them checks."""

PEAK_BF16_DENSE_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
)
"""(fragment of the device's name, dense bf16 tensor-core TFLOPS): NVIDIA's datasheet figures, the
with-sparsity ones halved; the first fragment found in the name wins (the SXM cards are "H100 80GB HBM3",
"H200")."""
MFU_CONVENTION = (
    "6 x flop_parameters x non-pad tokens/s / peak. flop_parameters: every parameter but the input embedding "
    "(a lookup, no matmul; the untied lm_head counts). Not counted: attention's score and value products "
    "(QK^T, PV: causal, about 6 x layers x hidden x the example's length per token, under 1 % of 6 N at "
    "Alpaca-GPT4-CN's lengths at 1b) "
    "and the forward that activation checkpointing recomputes, so it is model FLOPs utilisation, below the "
    "hardware's. peak: dense bf16 tensor-core TFLOPS, no sparsity (--peak-tflops, or the card's datasheet "
    "figure); None where neither is known (CPUs). Full fine-tuning's 6 N: with LoRA it overstates."
)

RUN_FIELDS = {
    "optim": ("optimizer", "s"),
    "packing": ("packing", "s"),
    "status": ("status", "s"),
    "imports_seconds": ("imports s (interpreter start to finetune imported)", ".1f"),
    "model_load_seconds": ("model load s", ".1f"),
    "data_seconds": ("data preparation s", ".1f"),
    "setup_seconds": ("trainer setup s (model to device, optimizer)", ".1f"),
    "first_step_seconds": ("first step s (warm-up)", ".2f"),
    "step_seconds": ("s per optimizer step (steady, median)", ".3f"),
    "slowest_step_seconds": ("slowest steady step s", ".3f"),
    "nonpad_tokens_per_step": ("non-pad tokens per step", ",.0f"),
    "nonpad_tokens_per_second": ("non-pad tokens/s", ",.0f"),
    "padding_share": ("padding share of computed tokens", ".3f"),
    "mfu": ("MFU", ".3f"),
    "optimizer_step_seconds": ("optimizer.step s (median)", ".4f"),
    "optimizer_share": ("optimizer.step share of a step", ".3f"),
    "evaluation_seconds": ("final evaluation s (with generation)", ".1f"),
    "generation_seconds": ("its generation s", ".1f"),
    "evaluation_without_generation_seconds": ("final evaluation s without generation", ".1f"),
    "save_seconds": ("final save s", ".1f"),
    "evaluation_calls": ("evaluations (during training and final)", "d"),
    "checkpoint_saves": ("checkpoints saved during training", "d"),
    "checkpoint_seconds": ("checkpoint saves s", ".1f"),
    "peak_gpu_memory_gib": ("peak GPU memory GiB", ".2f"),
    "train_loss": ("train loss", ".4f"),
    "total_seconds": ("run s (process start to exit)", ".1f"),
    "error": ("error", "s"),
}
"""Every field of a run's report: (what the table calls it, its format)."""


class BenchError(ValueError):
    """A benchmark that cannot start; the one-line message says why."""


# ---- the checkpoint and the data ----


def shape_sizes(shape: str) -> dict[str, int]:
    """The sizes ``shape`` gives config.json: the fixture's (its vocabulary is its tokenizer's, about 2,000
    pieces) or openPangu-Embedded-1B's published ones."""
    if shape == "1b":
        return dict(OPENPANGU_1B)
    if shape == "tiny":
        return dict(TINY_SHAPE)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def parameter_counts(config: dict[str, int]) -> tuple[int, int]:
    """(all parameters, the parameters whose matmuls the MFU counts: all but the input embedding), from the
    published names and shapes, without allocating a weight."""
    shapes = weight_shapes(config)
    total = sum(math.prod(shape) for shape in shapes.values())
    return total, total - math.prod(shapes["model.embed_tokens.weight"])


def resize_checkpoint(directory: Path, config_sizes: dict[str, int], seed: int = 0) -> None:
    """Give the fixture checkpoint in ``directory`` other sizes: its config.json's, and random bf16 weights
    under the published names, sharded as the fixture shards them; the tokenizer files stay."""
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(config_sizes)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for stale in directory.glob("model*.safetensors*"):
        stale.unlink()
    openpangu_fixture._save_sharded(openpangu_fixture._weights(config, seed), directory)


def reused_inputs(folder: Path, shape: str, train_records: int, eval_records: int) -> tuple[Path, dict[str, Any]]:
    """The checkpoint and the data's figures that an earlier benchmark wrote into ``folder``; a BenchError
    names what does not fit the benchmark asked for."""
    if not folder.is_dir():
        raise BenchError(f"--reuse {folder}: no such folder")
    checkpoint = folder / f"openPangu-Embedded-{shape}"
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise BenchError(f"--reuse {folder}: no checkpoint of shape {shape} there (no {config_path})")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    differing = [f"{key} {config.get(key)}, not {size}" for key, size in shape_sizes(shape).items()
                 if config.get(key) != size]
    if differing:
        raise BenchError(f"--reuse {folder}: its checkpoint is not of shape {shape} ({'; '.join(differing)})")
    if not (folder / WRITTEN).is_file():
        raise BenchError(
            f"--reuse {folder}: its checkpoint and data are unfinished (no {WRITTEN}: their write was stopped)"
        )
    data = json.loads((folder / WRITTEN).read_text(encoding="utf-8"))["data"]
    if (data["train_records"], data["eval_records"]) != (train_records, eval_records):
        raise BenchError(
            f"--reuse {folder}: its data has {data['train_records']} training and {data['eval_records']} validation "
            f"records, not {train_records} and {eval_records} (--train-records, --eval-records)"
        )
    return checkpoint, data


def _single_characters(tokenizer: Any) -> list[str]:
    """The vocabulary's Chinese characters that are pieces of their own."""
    return sorted(piece for piece in tokenizer.get_vocab() if len(piece) == 1 and "\u4e00" <= piece <= "\u9fff")


def _text_of(tokens: int, characters: list[str], count: Callable[[str], int], rng: random.Random) -> str:
    """Random characters that the tokenizer cuts into ``tokens`` tokens (merges may leave it a little short)."""
    text = ""
    for _ in range(8):
        missing = tokens - count(text)
        if missing <= 0:
            break
        text += "".join(rng.choices(characters, k=missing))
    return text


def alpaca_gpt4_cn_records(tokenizer: Any, count: int, seed: int = 0) -> list[dict[str, str]]:
    """``count`` Alpaca-schema records whose tokenized examples (the chat template's tokens included) have
    Alpaca-GPT4-CN's prompt and response lengths (``alpaca_gpt4_like_examples``)."""
    characters = _single_characters(tokenizer)

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    probe = tokenize_record(tokenizer, dict(instruction=characters[0], input="", output=characters[0]), MAX_SEQ_LENGTH)
    prompt_template = probe["labels"].count(IGNORE_INDEX) - length(characters[0])
    response_template = len(probe["input_ids"]) - probe["labels"].count(IGNORE_INDEX) - length(characters[0])
    rng = random.Random(seed)
    records = []
    # only the examples' lengths are taken, not their token ids
    for example in alpaca_gpt4_like_examples(count, vocab_size=8, max_seq_length=MAX_SEQ_LENGTH, seed=seed):
        prompt = example["labels"].count(IGNORE_INDEX)
        response = len(example["labels"]) - prompt
        records.append(dict(
            instruction=_text_of(max(1, prompt - prompt_template), characters, length, rng),
            input="",
            output=_text_of(max(1, response - response_template), characters, length, rng),
        ))
    return records


def write_data(path: Path, tokenizer: Any, train_records: int, eval_records: int, seed: int = 0) -> dict[str, Any]:
    """One JSON array of records, as Alpaca-GPT4-CN is published; returns what its examples measure."""
    records = alpaca_gpt4_cn_records(tokenizer, train_records + eval_records, seed)
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    lengths = [len(tokenize_record(tokenizer, record, MAX_SEQ_LENGTH)["input_ids"]) for record in records]
    return dict(
        train_records=train_records,
        eval_records=eval_records,
        max_seq_length=MAX_SEQ_LENGTH,
        tokens_per_record_mean=statistics.mean(lengths),
        tokens_per_record_stdev=statistics.stdev(lengths),
        published_tokens_per_record=f"{TOKENS_MEAN} +- {TOKENS_STD}",
    )


# ---- inside a run's process ----


class Probe:
    """What a run's process measures, as plain numbers for its report."""

    def __init__(self) -> None:
        self.imported_at = time.time()
        self.seconds: dict[str, float] = {}  # load, data, setup, save
        self.step_seconds: list[float] = []
        self.optimizer_seconds: list[float] = []
        self.step_tokens: list[torch.Tensor] = []  # per step: [non-pad tokens, computed tokens]
        self.pending_tokens: torch.Tensor | None = None  # the current step's, so far
        self.evaluations: list[tuple[float, float]] = []  # (seconds, of which generation)
        self.paused = 0.0  # seconds in evaluations and checkpoints since the start
        self.checkpoint_seconds: list[float] = []
        self.data_done: float | None = None
        self.train_loss: float | None = None

    def as_dict(self, exit_code: int) -> dict[str, Any]:
        tokens = torch.stack(self.step_tokens).tolist() if self.step_tokens else []
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None
        return dict(
            exit_code=exit_code, imported_at=self.imported_at, finished_at=time.time(), seconds=self.seconds,
            step_seconds=self.step_seconds, optimizer_seconds=self.optimizer_seconds, step_tokens=tokens,
            evaluations=self.evaluations, checkpoint_seconds=self.checkpoint_seconds, train_loss=self.train_loss,
            peak_gpu_memory_bytes=peak,
        )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(TrainerCallback):
    """Times each optimizer step (end to end, less the evaluations and checkpoints between) and the
    ``optimizer.step()`` inside it."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self._last_end = self._paused_at_last_end = self._optimizer_start = 0.0

    def _now(self, args: Any) -> float:
        _synchronize(args.device)
        return time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_end, self._paused_at_last_end = self._now(args), self.probe.paused
        if self.probe.data_done is not None:
            self.probe.seconds["setup"] = self._last_end - self.probe.data_done

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._optimizer_start = self._now(args)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.probe.optimizer_seconds.append(self._now(args) - self._optimizer_start)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = self._now(args)
        paused = self.probe.paused - self._paused_at_last_end
        self.probe.step_seconds.append(now - self._last_end - paused)
        if self.probe.pending_tokens is not None:
            self.probe.step_tokens.append(self.probe.pending_tokens)
            self.probe.pending_tokens = None
        self._last_end, self._paused_at_last_end = now, self.probe.paused


class TimedTrainer(hf_trainer.DualAdamTrainer):
    """The run's DualAdamTrainer, reporting to ``probe`` (set by ``instrumented`` on a subclass): tokens per
    step, evaluations, generation, saves."""

    probe: Probe

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(StepTimer(self.probe))

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        counts = batch_token_counts(inputs)
        if counts is not None:
            # what the model computes: a packed batch's one row of real tokens, a padded batch's whole layout
            computed = torch.stack([counts[0], counts.new_tensor(float(inputs["input_ids"].numel()))])
            pending = self.probe.pending_tokens
            self.probe.pending_tokens = computed if pending is None else pending + computed
        return super().training_step(model, inputs, num_items_in_batch)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        result = super().train(*args, **kwargs)
        self.probe.train_loss = result.training_loss
        return result

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        _synchronize(self.args.device)
        start, generation_before = time.perf_counter(), self.probe.seconds.get("generation", 0.0)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            _synchronize(self.args.device)
            seconds = time.perf_counter() - start
            self.probe.evaluations.append((seconds, self.probe.seconds.get("generation", 0.0) - generation_before))
            self.probe.paused += seconds

    def _generation_metrics(self, dataset: Any, prefix: str) -> dict[str, float]:
        start = time.perf_counter()
        try:
            return super()._generation_metrics(dataset, prefix)
        finally:
            _synchronize(self.args.device)
            self.probe.seconds["generation"] = self.probe.seconds.get("generation", 0.0) + time.perf_counter() - start

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        start = time.perf_counter()
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.probe.checkpoint_seconds.append(time.perf_counter() - start)
            self.probe.paused += self.probe.checkpoint_seconds[-1]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        start = time.perf_counter()
        super().save_model(output_dir, _internal_call)
        if not _internal_call:  # the final model; checkpoints save through _save_checkpoint
            self.probe.seconds["save"] = time.perf_counter() - start


def _timed(function: Callable[..., Any], probe: Probe, phase: str) -> Callable[..., Any]:
    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = function(*args, **kwargs)
        probe.seconds[phase] = time.perf_counter() - start
        if phase == "data":
            probe.data_done = time.perf_counter()
        return result

    return timed


@contextlib.contextmanager
def instrumented(probe: Probe) -> Iterator[None]:
    """For the run in this process: the names ``finetune.run`` calls, timed. It looks each one up when it
    runs (the loader in finetune's module, ``prepare_datasets`` and ``DualAdamTrainer`` imported inside it);
    a phase that a changed ``run`` no longer calls through them shows as missing in the report."""
    replaced = [
        (finetune, "load_model_and_tokenizer", _timed(finetune.load_model_and_tokenizer, probe, "load")),
        (sft_data, "prepare_datasets", _timed(sft_data.prepare_datasets, probe, "data")),
        (hf_trainer, "DualAdamTrainer", type(TimedTrainer.__name__, (TimedTrainer,), dict(probe=probe))),
    ]
    originals = [(module, name, getattr(module, name)) for module, name, _ in replaced]
    try:
        for module, name, stand_in in replaced:
            setattr(module, name, stand_in)
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def child_main(argv: Sequence[str]) -> int:
    """A run's process: ``REPORT.json FINETUNE_ARGS...``; finetune's own output goes to stdout and stderr."""
    probe = Probe()
    report, finetune_argv = Path(argv[0]), list(argv[1:])
    exit_code = 1
    try:
        with instrumented(probe):
            exit_code = finetune.main(finetune_argv)
    finally:
        report.write_text(json.dumps(probe.as_dict(exit_code)), encoding="utf-8")
    return exit_code


# ---- the parent: runs and their summary ----


def peak_tflops_of(name: str) -> tuple[float | None, str | None]:
    """(dense bf16 TFLOPS, the table's entry) for a device's name; (None, None) for one not in the table."""
    for fragment, tflops in PEAK_BF16_DENSE_TFLOPS:
        if fragment in name:
            return tflops, f"table: {fragment}"
    return None, None


def summarize(
    raw: dict[str, Any], *, launched: float, flop_parameters: int, peak_tflops: float | None
) -> dict[str, Any]:
    """A run's figures (``RUN_FIELDS``' numbers) from its process's report; the first step is the warm-up."""
    seconds, steps, tokens = raw["seconds"], raw["step_seconds"], raw["step_tokens"]
    missing = [phase for phase in ("load", "data", "setup", "save") if phase not in seconds]
    missing += ["steps"] if len(steps) < 2 or len(tokens) != len(steps) else []
    missing += ["evaluation"] if not raw["evaluations"] else []
    if missing:
        raise BenchError(f"the run finished without passing through {', '.join(missing)}: finetune's path changed")
    steady, optimizer, nonpad = steps[1:], raw["optimizer_seconds"][1:], [step[0] for step in tokens[1:]]
    computed = sum(step[1] for step in tokens[1:])
    tokens_per_second = statistics.median(count / seconds for count, seconds in zip(nonpad, steady))
    evaluation, generation = raw["evaluations"][-1]
    peak_memory = raw["peak_gpu_memory_bytes"]
    return dict(
        imports_seconds=raw["imported_at"] - launched,
        model_load_seconds=seconds["load"],
        data_seconds=seconds["data"],
        setup_seconds=seconds["setup"],
        first_step_seconds=steps[0],
        step_seconds=statistics.median(steady),
        slowest_step_seconds=max(steady),
        nonpad_tokens_per_step=statistics.mean(nonpad),
        nonpad_tokens_per_second=tokens_per_second,
        padding_share=(computed - sum(nonpad)) / computed,
        mfu=6 * flop_parameters * tokens_per_second / (peak_tflops * 1e12) if peak_tflops else None,
        optimizer_step_seconds=statistics.median(optimizer),
        optimizer_share=statistics.median(part / whole for part, whole in zip(optimizer, steady)),
        evaluation_seconds=evaluation,
        generation_seconds=generation,
        evaluation_without_generation_seconds=evaluation - generation,
        save_seconds=seconds["save"],
        evaluation_calls=len(raw["evaluations"]),
        checkpoint_saves=len(raw["checkpoint_seconds"]),
        checkpoint_seconds=sum(raw["checkpoint_seconds"]),
        peak_gpu_memory_gib=None if peak_memory is None else peak_memory / 2**30,
        train_loss=raw["train_loss"],
        total_seconds=raw["finished_at"] - launched,
    )


def _error_line(log: Path) -> str:
    """finetune's last ``error:`` line, else the log's last line (a traceback's exception)."""
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return (errors or lines or ["no output"])[-1]


def finetune_args(recipe: Path, *, checkpoint: Path, data: Path, validation_fraction: float, steps: int,
                  packing: bool, output_dir: Path, on_cpu: bool, extra: Sequence[str]) -> list[str]:
    """The command line of one run: the recipe, what the benchmark sets, then ``extra`` (which wins).
    No checkpoints while training: at ``max_steps`` transformers would save one that the recipe's run saves
    once at its end, not every few steps (the module docstring)."""
    return [
        str(recipe), "--model_name_or_path", str(checkpoint), "--dataset_name", str(data),
        "--validation_fraction", repr(validation_fraction), "--max_steps", str(steps),
        "--packing", str(packing).lower(), "--save_strategy", "no", "--output_dir", str(output_dir),
        "--overwrite_output_dir", "true", "--report_to", "none", "--disable_tqdm", "true",
        *(["--bf16", "false"] if on_cpu else []), *extra,
    ]


def check_arguments(argv: list[str]) -> None:
    """finetune's dry run on a run's command line: a refused flag stops the benchmark before any run."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = finetune.main([*argv, "--dry_run", "true"])
    if code != 0:
        line = (err.getvalue().strip().splitlines() or ["refused"])[-1].removeprefix("error: ")
        raise BenchError(f"finetune refuses {Path(argv[0]).name} with these flags: {line}")


def run_one(argv: list[str], run_dir: Path, *, flop_parameters: int, peak_tflops: float | None) -> dict[str, Any]:
    """One run in a fresh process; its log stays in ``run_dir``, its saved model does not."""
    run_dir.mkdir(parents=True)
    report, log = run_dir / "report.json", run_dir / "log.txt"
    environment = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(run_dir / "datasets_cache"),
        PYTHONUNBUFFERED="1",
    )
    command = [sys.executable, "-m", __name__, str(report), *argv]
    with log.open("w", encoding="utf-8") as output:
        launched = time.time()
        code = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=environment, check=False).returncode
    for produced in ("output", "datasets_cache"):
        shutil.rmtree(run_dir / produced, ignore_errors=True)
    if code != 0 or not report.exists():
        return dict(status="failed", error=_error_line(log))
    try:
        figures = summarize(json.loads(report.read_text(encoding="utf-8")), launched=launched,
                            flop_parameters=flop_parameters, peak_tflops=peak_tflops)
    except BenchError as error:
        return dict(status="failed", error=str(error))
    return dict(status="ok", error=None, **figures)


def _run_name(optim: str, packing: bool) -> str:
    return f"{optim}, packing {'on' if packing else 'off'}"


def _progress_line(result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return f"failed: {result['error']}"
    mfu = "" if result["mfu"] is None else f", MFU {100 * result['mfu']:.1f} %"
    peak = "" if result["peak_gpu_memory_gib"] is None else f", peak {result['peak_gpu_memory_gib']:.1f} GiB"
    return (f"{result['step_seconds']:.3f} s/step, {result['nonpad_tokens_per_second']:,.0f} non-pad tokens/s{mfu}"
            f"{peak}, {result['total_seconds']:.0f} s")


def run_benchmark(
    *,
    shape: str,
    steps: int,
    optims: Sequence[str],
    packings: Sequence[bool],
    recipes: Path,
    workdir: Path,
    peak_tflops: float | None = None,
    train_records: int = TRAIN_RECORDS,
    eval_records: int = EVAL_RECORDS,
    extra: Sequence[str] = (),
    reuse: Path | None = None,
    progress: Callable[[str], None] = lambda line: None,
    on_report: Callable[[dict[str, Any]], None] = lambda report: None,
) -> dict[str, Any]:
    """Write the checkpoint and the data into ``workdir`` (an existing, empty folder), or take them read-only
    from ``reuse``, the workdir of an earlier benchmark of the same shape and record counts; run every
    optimizer with every packing (each run's files in ``workdir``), and return the report (the module
    docstring says what it holds); ``on_report`` gets it before the first run and after each."""
    if shape not in SHAPES:
        raise BenchError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    unknown = [optim for optim in optims if optim not in RECIPES]
    if unknown:
        raise BenchError(f"unknown optim {unknown[0]!r}; known: {', '.join(RECIPES)}")
    if steps < 2:
        raise BenchError(f"steps must be at least 2 (the first is the warm-up), got {steps}")
    on_cpu = not torch.cuda.is_available()
    device = device_name(torch.device("cpu" if on_cpu else "cuda"))
    if peak_tflops:
        peak, peak_source = peak_tflops, "--peak-tflops"
    else:
        peak, peak_source = (None, None) if on_cpu else peak_tflops_of(device)

    if reuse is None:
        started = time.perf_counter()
        checkpoint = write_tiny_openpangu(workdir / f"openPangu-Embedded-{shape}")
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        write_checkpoint_seconds = time.perf_counter() - started
        started = time.perf_counter()
        data_path = workdir / DATA_FILE
        data = write_data(data_path, tokenizer, train_records, eval_records)
        write_data_seconds = time.perf_counter() - started
    else:
        checkpoint, data = reused_inputs(reuse, shape, train_records, eval_records)
        data_path = reuse / DATA_FILE
        write_checkpoint_seconds = write_data_seconds = 0.0
    # rounded up by the split to exactly eval_records
    validation_fraction = (eval_records - 0.5) / (train_records + eval_records)
    runs = [(optim, packing) for optim in optims for packing in packings]
    argvs = [
        finetune_args(recipes / RECIPES[optim], checkpoint=checkpoint, data=data_path,
                      validation_fraction=validation_fraction, steps=steps, packing=packing,
                      output_dir=workdir / f"run{index}" / "output", on_cpu=on_cpu, extra=extra)
        for index, (optim, packing) in enumerate(runs, start=1)
    ]
    for argv in argvs:
        check_arguments(argv)
    if reuse is None:
        # after the arguments' check: a refused flag costs no 2.8 GB write
        if shape != "tiny":
            started = time.perf_counter()
            resize_checkpoint(checkpoint, shape_sizes(shape))
            write_checkpoint_seconds += time.perf_counter() - started
        (workdir / WRITTEN).write_text(json.dumps(dict(shape=shape, data=data), indent=2) + "\n", encoding="utf-8")
        progress(f"checkpoint and data: written in {write_checkpoint_seconds + write_data_seconds:.1f} s")
    else:
        progress(f"checkpoint and data: reused from {reuse}")
    written = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    config = {key: written[key] for key in OPENPANGU_1B}
    parameters, flop_parameters = parameter_counts(config)

    results: list[dict[str, Any]] = []
    report = dict(
        shape=shape,
        config=config,
        parameters=parameters,
        flop_parameters=flop_parameters,
        device=device,
        torch=torch.__version__,
        cuda=torch.version.cuda if not on_cpu else None,
        transformers=transformers.__version__,
        peak_tflops=peak,
        peak_tflops_source=peak_source,
        mfu_convention=MFU_CONVENTION,
        steps=steps,
        data=data,
        write_checkpoint_seconds=write_checkpoint_seconds,
        write_data_seconds=write_data_seconds,
        reused_from=None if reuse is None else str(reuse),
        finetune_flags=list(extra),
        planned_runs=[_run_name(optim, packing) for optim, packing in runs],
        runs=results,
    )
    on_report(report)
    for index, ((optim, packing), argv) in enumerate(zip(runs, argvs), start=1):
        name = f"[{index}/{len(runs)}] {_run_name(optim, packing)}"
        progress(f"{name}: running")
        result = run_one(argv, workdir / f"run{index}", flop_parameters=flop_parameters, peak_tflops=peak)
        result = {field: result.get(field) for field in RUN_FIELDS} | dict(optim=optim, packing=packing)
        progress(f"{name}: {_progress_line(result)}")
        results.append(result)
        on_report(report)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The runs side by side (one column each, one row per figure), under a line that says what ran where."""

    def cell(value: Any, spec: str) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "on" if value else "off"
        return format(value, spec) if spec != "s" else str(value)

    peak = "no peak known (MFU -)" if report["peak_tflops"] is None else (
        f"peak {report['peak_tflops']:g} TFLOPS ({report['peak_tflops_source']})")
    config = report["config"]
    header = (
        f"{report['shape']}: {report['parameters'] / 1e6:,.1f}M parameters ({config['num_hidden_layers']} layers, "
        f"hidden {config['hidden_size']}, vocabulary {config['vocab_size']:,}), {report['steps']} steps, on "
        f"{report['device']}, torch {report['torch']}, transformers {report['transformers']}, {peak}; data "
        f"{report['data']['tokens_per_record_mean']:.1f} +- {report['data']['tokens_per_record_stdev']:.1f} tokens "
        f"per record (published {report['data']['published_tokens_per_record']})"
    )
    rows = [(label, [cell(run[field], spec) for run in report["runs"]])
            for field, (label, spec) in RUN_FIELDS.items() if field not in ("optim", "packing")]
    names = [_run_name(run["optim"], run["packing"]) for run in report["runs"]]
    lines = [header, "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))

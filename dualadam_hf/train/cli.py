"""What the training scripts share: the --dry_run flag and one ``main`` shape.

``script_main`` parses a recipe (which settles ``optim_args``), prints the resolved configuration, and either
stops there (--dry_run) or runs. Every user mistake ends in one line on stderr and a non-zero exit:
2 for the recipe, the command line or the launch configuration, 1 for data or models that cannot be loaded.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback

from dualadam_hf.hf.checkpoints import SaveError
from dualadam_hf.hf.packing import PackingError
from dualadam_hf.hf.preemption import RunPreempted
from dualadam_hf.hf.resume import check_resume
from dualadam_hf.hf.trainer import LaunchConfigError, NonFiniteError
from dualadam_hf.models.loading import ModelLoadError
from dualadam_hf.train.preflight import check_run_directories, check_settings, sets_aside_previous_run
from dualadam_hf.train.run_dir import OutputDirInUse, hold, let_go, mark_saved
from dualadam_hf.train.recipe import parse_for_this_machine
from dualadam_hf.train.records import write_run_record


class DataError(ValueError):
    """A problem with the user's data; the one-line message names the culprit."""


@dataclass
class RunArguments:
    dry_run: bool = field(
        default=False,
        metadata={"help": "Check the recipe, print the resolved configuration and exit: no weights, no data."},
    )


def script_main(
    argument_types: Sequence[type],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    describe: Callable[..., str],
    run: Callable[..., Any],
    resume_details: Callable[..., dict[str, Any]] | None = None,
) -> int:
    """``describe``, ``run`` and ``resume_details`` take the parsed dataclasses in order, without RunArguments;
    ``resume_details`` says what, besides the optimizer's settings, a checkpoint's state depends on (model,
    PEFT, data), for the resume check."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parsed, note = parse_for_this_machine(argument_types, argv, prog=prog, description=description)
        run_args = next(args for args in parsed if isinstance(args, RunArguments))
        settings = [args for args in parsed if not isinstance(args, RunArguments)]
        training_args = settings[-1]
        if training_args.optim_args_note:  # DualAdamTrainingArguments settled optim_args when it was built
            note += f"\nnote:            {training_args.optim_args_note}"
        for line in [*check_settings(training_args, dry_run=run_args.dry_run).splitlines(),
                     *check_run_directories(training_args).splitlines()]:
            note += f"\nnote:            {line}"
        training_args.run_details = resume_details(*settings) if resume_details else {}
        # the command line of this run, for run_config.json (and from there the exported model's card)
        training_args.run_command = shlex.join([f"scripts/{prog}", *argv])
        for line in check_resume(training_args).splitlines():
            note += f"\nnote:            {line}"
        summary = describe(*settings) + note
    except ValueError as error:  # RecipeError included: one line, naming the culprit
        report_error(str(error).splitlines()[0])
        return 2
    except KeyboardInterrupt:
        report_error("interrupted (Ctrl-C) during the pre-flight checks: nothing was written")
        return 130
    if run_args.dry_run:
        print(summary)
        return 0
    if training_args.process_index == 0:
        try:  # locked, and the previous run set aside, until the run ends (dualadam_hf.train.run_dir)
            hold(training_args, set_aside=sets_aside_previous_run(training_args))
        except OutputDirInUse as error:  # taken since pre-flight looked
            report_error(str(error))
            return 2
        print(summary, flush=True)
    finished = False
    try:
        run(*settings)
        finished = True
    except (DataError, ModelLoadError, NonFiniteError, SaveError) as error:
        report_error(str(error))
        return 1
    except (LaunchConfigError, PackingError) as error:  # the launcher's config, read once the Trainer exists;
        # a model that cannot be packed, known once it is loaded
        report_error(str(error))
        return 2
    except RunPreempted as stop:  # every process stops at the same step, after the checkpoint is written
        finished = True
        if training_args.process_index == 0:
            sys.stderr.write(f"{stop}; {resume_command(argv, stop.checkpoint)}\n")
            sys.stderr.flush()
        return stop.exit_code
    except KeyboardInterrupt:  # before or after the training loop, where Ctrl-C is not turned into a checkpoint
        report_error("interrupted (Ctrl-C) outside the training loop: nothing more was saved")
        return 130
    finally:
        let_go()  # puts the previous run back if this one never saved
        release_process_group(wait_for_the_others=finished)
    return 0


def resume_command(argv: Sequence[str], checkpoint: Any) -> str:
    """How to continue a stopped run: its command line with ``--resume_from_checkpoint`` pointing at ``checkpoint``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume_from_checkpoint":
            skip = True
        elif not arg.startswith("--resume_from_checkpoint="):
            kept.append(arg)
    flags = shlex.join([*kept, "--resume_from_checkpoint", str(checkpoint)])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"resume with the same launch command and: {flags}"
    return f"resume with: python {shlex.quote(sys.argv[0])} {flags}"


def report_error(message: str) -> None:
    """One ``error:`` line on stderr, in one write: under ``accelerate launch`` every rank reports, and
    ``print`` writes the text and its newline apart, so two ranks' lines could interleave."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def release_process_group(*, wait_for_the_others: bool) -> None:
    """Destroy the default process group, if there is one, while the interpreter is still whole.

    A process that leaves while another still exchanges data with it, or that leaves its group to
    interpreter shutdown, can die with SIGABRT ("terminate called without an active exception") from
    gloo's threads after a finished run, now and then (pytorch/pytorch#190489). After a finished run every
    process waits at a barrier first; after a failure it does not, since the others may never get there.
    (A process that fails after the last collective of a run leaves the others at the barrier until the
    launcher stops them or ``ddp_timeout`` passes.)
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait_for_the_others:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def train_and_save(
    trainer: Any,
    training_args: Any,
    *,
    evaluations: Sequence[tuple[str, Any]],
    run_kind: str,
    run_details: dict[str, Any],
    extra_train_metrics: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train (resuming if asked), save the model and trainer_state.json, evaluate on each
    (metric prefix, dataset or None for the validation set), save every metrics file and run_config.json."""
    trainer.add_callback(MarkSaved())
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    mark_saved()
    trainer.save_state()
    metrics = dict(result.metrics, **(extra_train_metrics or {}))
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    for prefix, dataset in evaluations:
        split_metrics = None if dataset is not None else evaluation_at_the_end(trainer, prefix)
        if split_metrics is None:
            split_metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)
        trainer.log_metrics(prefix, split_metrics)
        trainer.save_metrics(prefix, split_metrics)
        metrics.update(split_metrics)
    trainer.save_state()  # again, so trainer_state.json holds the final evaluations too
    if trainer.is_world_process_zero():
        # accepted resume changes, each with the step it took effect (dualadam_hf.hf.resume)
        write_run_record(training_args, run_kind, **run_details,
                         recipe_changes=getattr(training_args, "resume_changes", None) or [],
                         command=getattr(training_args, "run_command", None), processes=training_args.world_size)
    return metrics


class MarkSaved(TrainerCallback):
    """Tells the run directory that a checkpoint is published (``on_save`` follows the mixin's ``publish``):
    from then on a failed run keeps its own checkpoints, and the previous run it set aside can go."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        mark_saved()


def evaluation_at_the_end(trainer: Any, prefix: str) -> dict[str, float] | None:
    """The validation metrics the Trainer measured at the last step, if it did and the model is still the one
    it measured: transformers evaluates at the end of a run whose ``eval_strategy`` is ``steps`` (since 5.x),
    and evaluating again (generation included) would cost as much for the same numbers. None after
    ``load_best_model_at_end``, which puts another model in place."""
    if trainer.args.load_best_model_at_end:
        return None
    for entry in reversed(trainer.state.log_history):
        if entry.get("step") != trainer.state.global_step:
            return None
        if f"{prefix}_loss" in entry:
            return {key: value for key, value in entry.items() if key.startswith(f"{prefix}_") or key == "epoch"}
    return None


def at_least(minimum: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse ``type`` for numbers of ``kind`` no smaller than ``minimum``; argparse names the flag."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse
